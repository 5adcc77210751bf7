"""Hugging Face checkpoints: find them, read their tensors lazily, write them atomically.

A checkpoint is a directory with `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Reading goes through `CheckpointReader`, which opens shards memory-mapped and reads
a tensor only when asked for it, so taking two layers out of a 70B checkpoint reads two layers.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from elo.config import ModelConfig
from elo.files import atomic_dir
from elo.model import Transformer

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# files copied along with the weights so that the output directory is a complete HF model
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "chat_template.jinja", "original/tokenizer.model")
MAX_SHARD_BYTES = 5 * 10**9
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Local directory of a model: the offline default model's name, a local directory, or a hub id."""
    from elo.default_model import DEFAULT_MODEL, default_model_dir

    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory: it has no config.json")
        return path
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer.model", "original/tokenizer.model", "*.jinja"]
        return Path(snapshot_download(name, allow_patterns=patterns))
    raise FileNotFoundError(f"model {name!r} is neither a local directory, a hub id (org/name) nor {DEFAULT_MODEL!r}")


class CheckpointReader:
    """Lazy, counted access to the tensors of a safetensors checkpoint directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.directory / WEIGHTS_NAME).is_file():
            with safe_open(self.directory / WEIGHTS_NAME, framework="pt") as f:
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
            self._files[file] = safe_open(self.directory / file, framework="pt")
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

    def total_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in self.files())


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


def load_model(name_or_path: str | os.PathLike = "smollm2-135m-instruct", dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Transformer:
    """Load an HF Llama/Mistral/Qwen2 checkpoint (or an ELO submodel saved by elo) into a `Transformer`."""
    directory = resolve(name_or_path)
    config = load_config(directory)
    reader = CheckpointReader(directory)
    with torch.device("meta"):
        names = [n for n in Transformer(config).state_dict() if not (config.tie_word_embeddings and n == "lm_head.weight")]
    missing = [disk_name(n, config) for n in names if disk_name(n, config) not in reader.weight_map]
    if missing:
        raise ValueError(f"checkpoint {directory} lacks {len(missing)} tensor(s) its config needs, e.g. {missing[:3]}")
    state = {n: reader.get(disk_name(n, config)).to(device=device, dtype=dtype) for n in names}
    model = Transformer.from_state_dict(config, state)
    model.name_or_path = str(name_or_path)
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


def write_shards(tensors: Iterable[tuple[str, Tensor]], directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write (name, tensor) pairs as HF safetensors shards plus index (a single file when it fits), holding at most
    one shard in memory: shards are written as they fill and renamed once their count is known."""
    files: list[tuple[Path, list[str]]] = []
    shard: dict[str, Tensor] = {}
    size = total = 0

    def flush() -> None:
        path = directory / f".shard-{len(files):05d}"
        save_file(shard, path, metadata={"format": "pt"})
        files.append((path, list(shard)))

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = t.detach().to("cpu").contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(files) == 1:
        os.replace(files[0][0], directory / WEIGHTS_NAME)
        return
    weight_map = {}
    for i, (path, names) in enumerate(files, 1):
        file = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        os.replace(path, directory / file)
        weight_map.update(dict.fromkeys(names, file))
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


def save_model(model: Transformer, out_dir: str | os.PathLike, max_shard_bytes: int = MAX_SHARD_BYTES,
               tokenizer_from: str | os.PathLike | None = None) -> Path:
    """Write `model` as an HF checkpoint (config, safetensors shards, tokenizer files from its source), atomically."""
    config = model.config
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    source = tokenizer_from if tokenizer_from is not None else model.name_or_path
    source_dir = resolve(source) if source is not None else None
    dtype = model.model.embed_tokens.weight.dtype

    def fill(tmp: Path) -> None:
        write_shards(((disk_name(n, config), t) for n, t in state.items()), tmp, max_shard_bytes)
        write_config(config, dtype, tmp)
        copy_side_files(source_dir, tmp)

    return atomic_dir(out_dir, fill, "model directory")
