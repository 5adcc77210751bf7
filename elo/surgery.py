"""ELO surgery: detach the embedding, chosen decoder layers, final norm and head into a small standalone model,
and splice trained layers back into the full model, in memory or checkpoint to checkpoint.

Layers are numbered from 1 as in the paper: `[1, 32]` are the first and last layers of a 32-layer model, and
negative numbers count from the end (`-1` is the last). Because parameter names keep the original layer index,
splicing is a copy by name.
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import torch
from torch import Tensor

from elo.config import ModelConfig
from elo.hf.checkpoint import (INDEX_NAME, CheckpointReader, copy_side_files, disk_name, load_config,
                               rewrite_checkpoint, write_config, write_shards)
from elo.hf.hub import resolve
from elo.model import Transformer
from elo.tools.files import atomic_dir, check_output_dir

_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# weights in any format: a spliced checkpoint must not carry the base's stale copies of them
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def parse_layers(layers: Sequence[int] | str, num_layers: int) -> list[int]:
    """1-based layer numbers (ints or "1,32") -> sorted 0-based indices, with clear errors."""
    if isinstance(layers, str):
        try:
            layers = [int(s) for s in layers.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"layers {layers!r} must be comma-separated integers such as '1,{num_layers}'") from None
    if not isinstance(layers, Sequence) or any(isinstance(n, bool) or not isinstance(n, Integral) for n in layers):
        raise ValueError(f"layers {layers!r}: expected a list of 1-based layer numbers (ints) such as "
                         f"[1, {num_layers}], or a string such as '1,{num_layers}'")
    layers = [int(n) for n in layers]
    if not layers:
        raise ValueError("no layers given; expected 1-based layer numbers such as [1, %d]" % num_layers)
    ids = []
    for n in layers:
        if n == 0 or not -num_layers <= n <= num_layers:
            raise ValueError(f"layer {n} is out of range: layers are numbered 1..{num_layers} "
                             f"(or -1..-{num_layers} from the end) for this {num_layers}-layer model")
        ids.append(n - 1 if n > 0 else num_layers + n)
    if len(set(ids)) != len(ids):
        raise ValueError(f"layers {list(layers)} name the same layer twice")
    return sorted(ids)


def submodel_config(base: ModelConfig, ids: list[int], base_name: str | None = None, fp: str = "") -> ModelConfig:
    """The config of ELO's submodel of `base` holding the decoder layers `ids` (0-based, from parse_layers), with the
    'elo' record of where they came from."""
    if base.elo is not None:
        raise ValueError(f"this model is already an ELO submodel of {base.elo['base']!r}; detach from the full model")
    return base.replace(
        num_hidden_layers=len(ids), layer_ids=ids, layer_types=[base.layer_types[i] for i in ids],
        elo={"base": base_name, "base_num_hidden_layers": base.num_hidden_layers,
             "layers": [i + 1 for i in ids], "fingerprint": fp},
    )


def _keep(name: str, ids: list[int]) -> bool:
    m = _LAYER.match(name)
    return m is None or int(m[1]) in ids


def detach(model: Transformer, layers: Sequence[int] | str) -> Transformer:
    """A standalone copy of the embedding, the given decoder layers (1-based), the final norm and the head."""
    ids = parse_layers(layers, model.config.num_hidden_layers)
    config = submodel_config(model.config, ids, model.name_or_path, model.fingerprint())
    state = {n: t.detach().clone() for n, t in model.state_dict().items() if _keep(n, ids)}
    sub = Transformer.from_state_dict(config, state)
    sub.name_or_path = model.name_or_path
    return sub


def _check_base(sub: ModelConfig, base: ModelConfig, base_fp: str, where: str) -> None:
    if sub.elo is None:
        raise ValueError("the second model is not an ELO submodel (its config has no 'elo' record); detach one first")
    if base.elo is not None:
        raise ValueError(f"{where} is itself an ELO submodel; splice into the full base model")
    n = sub.elo["base_num_hidden_layers"]
    shape = lambda c: (c.architecture, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.vocab_size)
    if n != base.num_hidden_layers or shape(sub) != shape(base):
        raise ValueError(f"submodel was detached from a {n}-layer {shape(sub)} model ({sub.elo['base']!r}); "
                         f"{where} is a {base.num_hidden_layers}-layer {shape(base)} model")
    if sub.elo["fingerprint"] != base_fp:
        raise ValueError(f"submodel was detached from {sub.elo['base']!r} (fingerprint {sub.elo['fingerprint']}); "
                         f"{where} is a different model (fingerprint {base_fp})")


@torch.no_grad()
def splice(model: Transformer, sub: Transformer) -> Transformer:
    """Copy the submodel's layers (and its embedding, norm and head, changed only if they were trained) into
    `model`, in place."""
    _check_base(sub.config, model.config, model.fingerprint(), "the target model")
    target = model.state_dict()
    for name, t in sub.state_dict().items():
        target[name].copy_(t)
    return model


@dataclass
class Selection:
    """A model as a selection of checkpoint tensors: its config, and for each parameter (by its name in memory) the
    reader and the name on disk to read it from. Nothing is read but headers, the final norm and 4 embedding rows;
    in-memory surgery, checkpoint-to-checkpoint surgery and sharded training (elo.train.build) all read through it."""
    config: ModelConfig
    tensors: dict[str, tuple[CheckpointReader, str]]
    reader: CheckpointReader  # the checkpoint the rest comes from: dtype, tokenizer and side files


def select_full(src: str | os.PathLike | CheckpointReader) -> Selection:
    """Every tensor of a model."""
    reader = src if isinstance(src, CheckpointReader) else CheckpointReader(resolve(src))
    config = load_config(reader.directory)
    return Selection(config, {n: (reader, disk_name(n, config)) for n in reader.names_for(config)}, reader)


def select_detached(src: str | os.PathLike, layers: Sequence[int] | str) -> Selection:
    """ELO's submodel of the full model `src`: embedding, the given decoder layers (1-based), final norm and head."""
    reader = CheckpointReader(resolve(src))
    base = load_config(reader.directory)
    config = submodel_config(base, parse_layers(layers, base.num_hidden_layers), str(src), reader.fingerprint())
    return Selection(config, {n: (reader, n) for n in reader.names_for(base) if _keep(n, config.layer_ids)}, reader)


def select_spliced(base: str | os.PathLike, sub: str | os.PathLike) -> Selection:
    """The base model with a trained ELO submodel's tensors in place of its own, checked to be the base the
    submodel was detached from."""
    base_reader = CheckpointReader(resolve(base))
    full, part = select_full(base_reader), select_full(sub)
    _check_base(part.config, full.config, base_reader.fingerprint(), str(base))
    unknown = sorted(set(part.tensors) - set(full.tensors))
    if unknown:
        raise ValueError(f"submodel tensors {unknown[:3]} have no counterpart in the base checkpoint {base}")
    return Selection(full.config, {**full.tensors, **part.tensors}, base_reader)


def load_detached(src: str | os.PathLike, layers: Sequence[int] | str, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> Transformer:
    """`detach(load_model(src), layers)`, reading only the tensors the submodel needs (two layers of a 70B model
    are read, not seventy billion parameters)."""
    selection = select_detached(src, layers)
    sub = Transformer.from_state_dict(selection.config, {n: reader.get(name).to(device=device, dtype=dtype)
                                                         for n, (reader, name) in selection.tensors.items()})
    sub.name_or_path = str(src)
    return sub


def detach_checkpoint(src: str | os.PathLike, layers: Sequence[int] | str, out: str | os.PathLike) -> Path:
    """`detach` from checkpoint to checkpoint, reading only the tensors the submodel needs."""
    check_output_dir(out, "output directory")
    selection = select_detached(src, layers)
    config, tensors, reader = selection.config, selection.tensors, selection.reader
    dtype = reader.info("model.embed_tokens.weight")[1]

    def fill(tmp: Path) -> None:
        layout = [(disk_name(n, config), *r.info(name)) for n, (r, name) in tensors.items()]
        write_shards(layout, ((disk_name(n, config), r.get(name)) for n, (r, name) in tensors.items()), tmp)
        write_config(config, dtype, tmp)
        copy_side_files(reader.directory, tmp)

    return atomic_dir(out, fill, "output directory")


def splice_checkpoint(base: str | os.PathLike, sub: str | os.PathLike, out: str | os.PathLike) -> Path:
    """`splice` from checkpoint to checkpoint: stream the base tensor by tensor (memory: one output shard + submodel),
    replacing the tensors the submodel holds; shard layout, config, tokenizer and every other non-weight file
    (README.md, licence...) are the base's, so splicing in place loses nothing but the replaced tensors."""
    check_output_dir(out, "output directory")
    selection = select_spliced(base, sub)
    base_reader, base_dir = selection.reader, selection.reader.directory
    # the base's own tensors are read while streaming; the submodel's (a few layers) replace them by name
    replacements = {name: r.get(disk) for name, (r, disk) in selection.tensors.items() if r is not base_reader}

    def replace(name: str, t: Tensor) -> Tensor:
        new = replacements.get(name)
        if new is None:
            return t
        if new.shape != t.shape:
            raise ValueError(f"{name}: submodel shape {tuple(new.shape)} != base shape {tuple(t.shape)}")
        return new.to(t.dtype)

    def fill(tmp: Path) -> None:
        rewrite_checkpoint(base_reader, tmp, replace)
        for path in base_dir.rglob("*"):  # config, tokenizer and every other non-weight file (README, licence...)
            rel = path.relative_to(base_dir)
            if (path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name != INDEX_NAME
                    and not rel.parts[0].startswith(".")):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, tmp / rel)

    return atomic_dir(out, fill, "output directory")
