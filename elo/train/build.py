"""Building the model a stage trains, and exporting it: which tensors it holds, where each comes from, which train.

A model is described by a `ModelSpec`: its config, and for every tensor a `TensorSource` (a checkpoint tensor, or a
deterministic initialiser for new LoRA adapters). `materialize` builds the model on the meta device, marks what
trains, applies activation checkpointing / compile / FSDP2, and only then gives each process its own rows of each
tensor, read straight from the safetensors files: no process ever holds the whole model. `export` streams the
trained model back out one gathered tensor at a time.

Builders: the ELO submodel (`elo_spec`), the full model (`full_spec`), LoRA on the full model (`add_lora_spec`),
and the base with an ELO submodel's layers spliced in (`spliced_spec`, for alignment).
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from elo.config import ModelConfig
from elo.hf.checkpoint import (CheckpointReader, copy_side_files, disk_name, save_middle, write_config,
                               write_shards)
from elo.hf.hub import resolve
from elo.lora import LoRALinear, add_lora
from elo.model import Transformer, rope_inv_freq
from elo.tools.files import atomic_dir
from elo.train import distributed
from elo.surgery import Selection, parse_layers, select_detached, select_full, select_spliced


@dataclass
class TensorSource:
    """Rows of one tensor: from a checkpoint (`reader`, `name` on disk), or from `init` (a full tensor)."""
    reader: CheckpointReader | None = None
    name: str = ""
    init: Callable[[], Tensor] | None = None

    def rows(self, start: int, stop: int) -> Tensor:
        if self.init is not None:
            return self.init()[start:stop]
        return self.reader.get_slice(self.name, start, stop)

    def full(self) -> Tensor:
        return self.init() if self.init is not None else self.reader.get(self.name)


@dataclass
class ModelSpec:
    config: ModelConfig
    sources: dict[str, TensorSource]  # parameter name in memory -> where its values come from
    name_or_path: str  # tokenizer and side files are copied from here on export
    lora: tuple[int, float] | None = None  # (rank, alpha) when LoRA adapters are added
    trainable: Callable[[str], bool] = field(default=lambda name: True)  # which parameters train
    export_config: ModelConfig | None = None  # export as this smaller model (in-situ ELO writes its submodel)


def _spec(selection: Selection, name_or_path: str, trainable: Callable[[str], bool] = lambda name: True) -> ModelSpec:
    sources = {n: TensorSource(reader, name) for n, (reader, name) in selection.tensors.items()}
    return ModelSpec(selection.config, sources, name_or_path, trainable=trainable)


def full_spec(model: str) -> ModelSpec:
    """The whole model, every parameter training (full fine-tuning)."""
    return _spec(select_full(model), model)


def elo_spec(model: str, layers: Sequence[int] | str, train_embeddings: bool = False) -> ModelSpec:
    """ELO's submodel (elo.surgery.select_detached): embedding, the chosen decoder layers, final norm and head;
    only the layers train."""
    return _spec(select_detached(model, layers), model, elo_trainable(train_embeddings))


def elo_trainable(train_embeddings: bool) -> Callable[[str], bool]:
    """Which of the submodel's parameters ELO trains: its decoder layers (and, asked, embedding, norm and head)."""
    return (lambda n: True) if train_embeddings else (lambda n: n.startswith("model.layers."))


def spliced_spec(base: str, sub_dir: str | os.PathLike) -> ModelSpec:
    """The base model with a trained ELO submodel's tensors in place of its own (alignment's starting point,
    elo.surgery.select_spliced); nothing is written to disk."""
    return _spec(select_spliced(base, sub_dir), base)


def in_situ_spec(model: str, layers: Sequence[int] | str, train_embeddings: bool = False) -> ModelSpec:
    """The whole model with only ELO's chosen layers training: their exact gradients, the middle computed and
    frozen. The upper bound for any stand-in of the middle, not a method (it costs a full forward and backward).
    Exported as the ELO submodel, so align.py continues from it as from any ELO run."""
    submodel = select_detached(model, layers).config
    spec = full_spec(model)
    spec.trainable = in_situ_trainable(submodel.layer_ids, train_embeddings)
    spec.export_config = submodel
    return spec


def in_situ_trainable(ids: Sequence[int], train_embeddings: bool) -> Callable[[str], bool]:
    """Which of the full model's parameters the oracle trains: the chosen decoder layers (0-based `ids`) and, asked,
    embedding, norm and head."""
    prefixes = tuple(f"model.layers.{i}." for i in ids)
    return lambda n: n.startswith(prefixes) or (train_embeddings and not n.startswith("model.layers."))


def train_only_layers(spec: ModelSpec, layers: str) -> ModelSpec:
    """Only these decoder layers (1-based) train; every layer still computes."""
    ids = parse_layers(layers, spec.config.num_hidden_layers)
    prefixes = tuple(f"model.layers.{i}." for i in ids)
    spec.trainable = lambda n: n.startswith(prefixes)
    return spec


def add_lora_spec(spec: ModelSpec, rank: int, alpha: float, seed: int) -> ModelSpec:
    """LoRA adapters on every decoder linear: A kaiming-uniform (seeded by name, so every process agrees), B zero."""
    spec.lora = (rank, alpha)
    spec.trainable = lambda n: n.endswith((".lora_A", ".lora_B"))
    c = spec.config
    shapes = {"q_proj": (c.num_attention_heads * c.head_dim, c.hidden_size),
              "k_proj": (c.num_key_value_heads * c.head_dim, c.hidden_size),
              "v_proj": (c.num_key_value_heads * c.head_dim, c.hidden_size),
              "o_proj": (c.hidden_size, c.num_attention_heads * c.head_dim),
              "gate_proj": (c.intermediate_size, c.hidden_size), "up_proj": (c.intermediate_size, c.hidden_size),
              "down_proj": (c.hidden_size, c.intermediate_size)}
    for i in c.layer_ids:
        for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                            ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for proj in names:
                out_f, in_f = shapes[proj]
                prefix = f"model.layers.{i}.{part}.{proj}"
                spec.sources[f"{prefix}.lora_A"] = TensorSource(init=_kaiming(rank, in_f, seed, prefix))
                spec.sources[f"{prefix}.lora_B"] = TensorSource(init=lambda o=out_f: torch.zeros(o, rank))
    return spec


def _kaiming(rows: int, cols: int, seed: int, name: str) -> Callable[[], Tensor]:
    def init() -> Tensor:
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        bound = 1 / math.sqrt(cols)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT initialise A
        return (torch.rand(rows, cols, generator=g) * 2 - 1) * bound
    return init


def _shard_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows of an n-row tensor that FSDP2's Shard(0) gives `rank` (torch.chunk's split)."""
    per = math.ceil(n / world) if n else 0
    return min(rank * per, n), min((rank + 1) * per, n)


def meta_model(spec: ModelSpec) -> Transformer:
    """The model of `spec` on the meta device (no memory), its LoRA adapters added and what trains marked: what
    `materialize` fills and what the resource plan (elo.pipeline.resources) measures."""
    with torch.device("meta"):
        model = Transformer(spec.config)
    if spec.lora:
        add_lora(model, *spec.lora)
    for name, p in model.named_parameters():
        p.requires_grad_(spec.trainable(name))
    return model


@torch.no_grad()
def materialize(spec: ModelSpec, d: distributed.Dist, activation_checkpointing: bool = False,
                compile: bool = False, cpu_offload: bool = False) -> Transformer:
    """The model of `spec` on `d.device`, fp32 master weights, sharded over the processes, each reading only its
    own rows of every tensor."""
    model = meta_model(spec)
    distributed.parallelize(model, d, activation_checkpointing, compile, cpu_offload)
    model.to_empty(device="cpu" if cpu_offload else d.device)  # offloaded shards live in CPU memory
    if spec.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty made two tensors of one
    for name, p in model.named_parameters():
        src = spec.sources[name]
        if hasattr(p, "to_local"):  # a DTensor sharded on dim 0: read this process's rows only
            local = p.to_local()
            start, stop = _shard_rows(p.shape[0], d.world_size, d.rank)
            assert local.shape[0] == stop - start, (name, local.shape, start, stop)
            if stop > start:
                local.copy_(src.rows(start, stop))
        else:
            p.copy_(src.full())
    model.rope.to(d.device)  # offloaded too: only the shards live in CPU memory; RoPE computes beside the activations
    model.rope.inv_freq.copy_(rope_inv_freq(spec.config))
    model.name_or_path = spec.name_or_path
    return model


def _gathered(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, full tensor) for each parameter in order; on several processes every one must iterate it in step."""
    for name, p in model.named_parameters():
        yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


def export(model: Transformer, out: Path, d: distributed.Dist, lora_scale: float | None = None,
           extra: Callable[[Path], None] | None = None, config: ModelConfig | None = None) -> Path:
    """Write the trained model as an HF checkpoint (LoRA merged), streaming one gathered tensor at a time to the
    main process, which writes it straight into its output shard: no process holds more than its own shards and
    one full tensor. `extra(tmp)` adds files (e.g. provenance). `config`: write only the tensors of this smaller
    model (a submodel config of `model`'s)."""
    config = config or model.config
    dtype = model.model.embed_tokens.weight.dtype
    with torch.device("meta"):
        kept = set(Transformer(config).state_dict())

    merged = lora_scale is not None  # adapters fold into their weights: x.weight += scale * x.lora_B @ x.lora_A
    layout = [(disk_name(n, config), tuple(p.shape), p.dtype) for n, p in model.named_parameters() if n in kept]

    def tensors() -> Iterator[tuple[str, Tensor]]:
        pending: dict[str, Tensor] = {}
        for name, t in _gathered(model):
            if merged and _is_lora(model, name) and name.endswith((".lora_A", ".lora_B", ".weight")):
                pending[name] = t
                prefix = name.rsplit(".", 1)[0]
                if all(f"{prefix}.{k}" in pending for k in ("weight", "lora_A", "lora_B")):
                    w, a, b = (pending.pop(f"{prefix}.{k}").float() for k in ("weight", "lora_A", "lora_B"))
                    yield disk_name(f"{prefix}.weight", config), (w + lora_scale * (b @ a)).to(t.dtype).cpu()
                continue
            if name in kept:  # every tensor is gathered (all processes take part); only the kept ones are written
                yield disk_name(name, config), t.cpu()

    if not d.main:
        for _ in tensors():  # take part in every gather
            pass
        distributed.barrier(d)
        return out

    def fill(tmp: Path) -> None:
        write_shards(layout, tensors(), tmp)
        write_config(config, dtype, tmp)
        copy_side_files(resolve(model.name_or_path), tmp)
        if model.middle is not None:  # an ELO submodel's surrogate travels with it (transformers ignores the file)
            save_middle(model.middle, tmp)
        if extra is not None:
            extra(tmp)

    atomic_dir(out, fill, "model directory")
    distributed.barrier(d)
    return out


def _is_lora(model: nn.Module, name: str) -> bool:
    return isinstance(model.get_submodule(name.rsplit(".", 1)[0]), LoRALinear)
