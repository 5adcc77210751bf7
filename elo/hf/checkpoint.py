"""Hugging Face checkpoints: find them, read their tensors lazily, write them atomically.

A checkpoint is a directory with `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Reading goes through `CheckpointReader`, which opens shards memory-mapped and reads
a tensor only when asked for it, so taking two layers out of a 70B checkpoint reads two layers.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file
from torch import Tensor

from elo.config import ModelConfig
from elo.hf.default_model import DEFAULT_MODEL
from elo.hf.hub import resolve
from elo.model import (DecoderLayer, FrozenAffine, MiddleBlocks, MiddleSurrogate, Transformer, attach_middle,
                       fingerprint)
from elo.tools.files import atomic_dir, atomic_file, check_output_dir

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MIDDLE_NAME = "middle.safetensors"  # an ELO submodel's middle-layer surrogate (elo.extensions.middle), which transformers ignores
# files copied along with the weights so that the output directory is a complete HF model
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "chat_template.jinja", "original/tokenizer.model")
MAX_SHARD_BYTES = 5 * 10**9
def open_safetensors(path: Path):
    """`safe_open`, with an error naming the file when it is truncated or not safetensors at all."""
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt") from None


class CheckpointReader:
    """Lazy, counted access to the tensors of a safetensors checkpoint directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
        elif (self.directory / WEIGHTS_NAME).is_file():
            with open_safetensors(self.directory / WEIGHTS_NAME) as f:
                self.weight_map = {k: WEIGHTS_NAME for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
        self._files: dict[str, object] = {}
        self.bytes_read = 0  # what `get` returned so far: lets tests and benchmarks prove laziness

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def files(self) -> list[str]:
        return list(dict.fromkeys(self.weight_map.values()))

    def _open(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.directory}")
        file = self.weight_map[name]
        if file not in self._files:
            self._files[file] = open_safetensors(self.directory / file)
        return self._files[file]

    def get(self, name: str) -> Tensor:
        t = self._open(name).get_tensor(name)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the header alone."""
        return tuple(self._open(name).get_slice(name).get_shape())

    def get_rows(self, name: str, n: int) -> Tensor:
        """The first n rows of a tensor, reading only those."""
        t = self._open(name).get_slice(name)[:n]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of a tensor, read from the file header alone."""
        sl = self._open(name).get_slice(name)
        return tuple(sl.get_shape()), _TORCH_DTYPES[sl.get_dtype()]

    def fingerprint(self) -> str:
        """The base model's identity (elo.model.fingerprint), from the final norm and 4 embedding rows."""
        return fingerprint(self.get("model.norm.weight"), self.get_rows("model.embed_tokens.weight", 4))

    def names_for(self, config: ModelConfig) -> list[str]:
        """The in-memory parameter names of a model of `config` (a tied head has none of its own), after checking
        that the checkpoint holds every one of them."""
        with torch.device("meta"):
            names = [n for n in Transformer(config).state_dict()
                     if not (config.tie_word_embeddings and n == "lm_head.weight")]
        missing = [disk_name(n, config) for n in names if disk_name(n, config) not in self.weight_map]
        if missing:
            raise ValueError(f"checkpoint {self.directory} lacks {len(missing)} tensor(s) its config needs, "
                             f"e.g. {missing[:3]}")
        return names

    def get_slice(self, name: str, start: int, stop: int) -> Tensor:
        """Rows start:stop of a tensor (dim 0), reading only those: how a process loads its own shard."""
        t = self._open(name).get_slice(name)[start:stop]
        self.bytes_read += t.numel() * t.element_size()
        return t


def disk_name(name: str, config: ModelConfig) -> str:
    """Parameter name inside a checkpoint. A detached submodel is stored as a valid HF model with its layers
    numbered 0..k-1 (so transformers loads it); its config's `elo.layers` keeps the original numbers."""
    m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    if config.elo is None or not m:
        return name
    return f"model.layers.{config.layer_ids.index(int(m[1]))}.{m[2]}"


def memory_name(name: str, config: ModelConfig) -> str:
    m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    if config.elo is None or not m:
        return name
    return f"model.layers.{config.layer_ids[int(m[1])]}.{m[2]}"


def load_config(directory: str | os.PathLike) -> ModelConfig:
    return ModelConfig.from_file(Path(directory) / "config.json")


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Transformer:
    """Load an HF Llama/Mistral/Qwen2 checkpoint (or an ELO submodel saved by elo, with its middle-layer surrogate
    when the directory holds one) into a `Transformer`."""
    directory = resolve(name_or_path)
    config = load_config(directory)
    reader = CheckpointReader(directory)
    state = {n: reader.get(disk_name(n, config)).to(device=device, dtype=dtype) for n in reader.names_for(config)}
    model = Transformer.from_state_dict(config, state)
    model.name_or_path = str(name_or_path)
    if (directory / MIDDLE_NAME).is_file():
        attach_middle(model, load_middle(directory, device))
    return model


def copy_side_files(src: Path | None, dst: Path) -> None:
    if src is None:
        return
    for name in SIDE_FILES:
        if (src / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst / name)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_config(config: ModelConfig, dtype: torch.dtype, directory: Path) -> None:
    hf = config.to_hf()
    hf["torch_dtype"] = hf["dtype"] = _dtype_name(dtype)
    (directory / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
Layout = list[tuple[str, tuple[int, ...], torch.dtype]]  # (name, shape, dtype) of each tensor, in writing order


def _write_shard(path: Path, layout: Layout, tensors: Iterator[tuple[str, Tensor]]) -> None:
    """One safetensors file, written as the tensors arrive: the header first (it needs only names, shapes and
    dtypes), then each tensor's bytes, so only the tensor being written is in memory."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in layout:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape, dtype in layout:
            got, t = next(tensors)
            if got != name or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"expected tensor {name} {tuple(shape)} {dtype}, got {got} {tuple(t.shape)} {t.dtype}")
            f.write(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))


def write_shards(layout: Layout, tensors: Iterable[tuple[str, Tensor]], directory: Path,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write the tensors of `layout`, arriving from `tensors` in the same order, as HF safetensors shards plus index
    (a single file when it fits). Streamed: memory holds one tensor, never a shard."""
    shards: list[Layout] = [[]]
    size = total = 0
    for name, shape, dtype in layout:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), dtype))
        size += nbytes
        total += nbytes
    stream = iter(tensors)
    if len(shards) == 1:
        _write_shard(directory / WEIGHTS_NAME, shards[0], stream)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(directory / file, shard, stream)
        weight_map.update(dict.fromkeys((name for name, _, _ in shard), file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def rewrite_checkpoint(reader: CheckpointReader, directory: Path,
                       fn: Callable[[str, Tensor], Tensor | None]) -> None:
    """Write every tensor of `reader` through `fn(name, tensor)` (None drops it) into `directory`, in the source's
    shard layout. One shard is built at a time from tensors read one by one, so memory holds one output shard plus
    whatever `fn` reads beside the tensor it is given."""
    weight_map: dict[str, str] = {}
    total = 0
    for file in reader.files():
        shard = {}
        for name in [n for n, f in reader.weight_map.items() if f == file]:
            t = fn(name, reader.get(name))
            if t is not None:
                shard[name] = t.contiguous()
                total += t.numel() * t.element_size()
        if shard:
            save_file(shard, directory / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
    if (reader.directory / INDEX_NAME).is_file():
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def save_model(model: Transformer, out_dir: str | os.PathLike, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `model` as an HF checkpoint (config, safetensors shards, tokenizer files from its source, and an ELO
    submodel's middle-layer surrogate as `middle.safetensors`), atomically.
    A destination that is a file, or a non-empty directory elo did not write, is refused (see elo.tools.files)."""
    check_output_dir(out_dir, "model directory")
    config = model.config
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    source_dir = resolve(model.name_or_path) if model.name_or_path is not None else None
    dtype = model.model.embed_tokens.weight.dtype

    def fill(tmp: Path) -> None:
        layout = [(disk_name(n, config), tuple(t.shape), t.dtype) for n, t in state.items()]
        write_shards(layout, ((disk_name(n, config), t) for n, t in state.items()), tmp, max_shard_bytes)
        write_config(config, dtype, tmp)
        copy_side_files(source_dir, tmp)
        if model.middle is not None:
            save_middle(model.middle, tmp)

    return atomic_dir(out_dir, fill, "model directory")


def save_middle(surrogate: MiddleSurrogate, directory: str | os.PathLike) -> Path:
    """Write `directory/middle.safetensors` atomically: per gap (`key`: the upper layer's 0-based index) `{key}.weight`
    and `{key}.bias` (linear), or `{key}.blocks.{b}.` + a decoder layer's HF names (distilled); and the fit
    statistics as JSON in the metadata (key `elo_middle`)."""
    tensors = {f"{key}.{name}": t.detach().to("cpu").contiguous()
               for key, m in surrogate.items() for name, t in m.named_buffers()}
    path = Path(directory) / MIDDLE_NAME
    with atomic_file(path, "wb") as f:
        f.write(save(tensors, metadata={"format": "pt", "elo_middle": json.dumps(surrogate.stats)}))
    return path


def load_middle(directory: str | os.PathLike, device: str | torch.device = "cpu") -> MiddleSurrogate:
    """The surrogate saved by `save_middle` in `directory`."""
    path = Path(directory) / MIDDLE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MIDDLE_NAME} in {directory}")
    with safe_open(path, framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if "elo_middle" not in meta:
            raise ValueError(f"{path} has no 'elo_middle' metadata; it was not written by elo.save_middle")
        stats = json.loads(meta["elo_middle"])
        keys = [str(hi - 1) for _, hi in stats["gaps"]]
        if stats["kind"] == "linear":
            maps = {k: FrozenAffine(f.get_tensor(f"{k}.weight"), f.get_tensor(f"{k}.bias")) for k in keys}
        else:  # distilled: decoder blocks, shaped by the base's config, each with the window of the layer it began as
            config = ModelConfig.from_hf(stats["config"])
            maps = {}
            for k, init in zip(keys, stats["init_layers"]):
                with torch.device("meta"):
                    blocks = MiddleBlocks([DecoderLayer(config) for _ in init], [config.window(j - 1) for j in init])
                prefix = f"{k}."
                maps[k] = blocks.freeze({name.removeprefix(prefix): f.get_tensor(name) for name in f.keys()
                                         if name.startswith(prefix)})
    return MiddleSurrogate(maps, stats)
