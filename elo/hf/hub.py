"""Model names and where they resolve: the offline default model's name, a local directory, or a Hugging Face hub id
(downloaded into huggingface_hub's own cache, or read from it offline with HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from huggingface_hub import snapshot_download

from elo.hf.default_model import DEFAULT_MODEL, default_model_dir

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Local directory of a model: the offline default model's name, a local directory, or a hub id."""
    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory: it has no config.json")
        return path
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        try:
            return _snapshot(name)
        except Exception as e:  # offline, unknown or gated repo, hub down: hub errors are many-line and many-typed
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(f"model {name!r} is not a local directory and the Hugging Face hub could not "
                                    f"provide it ({type(e).__name__}: {reason})") from e
    raise FileNotFoundError(f"model {name!r} is neither a local directory, a hub id (org/name) nor {DEFAULT_MODEL!r}")


@functools.lru_cache(maxsize=None)
def _snapshot(repo_id: str) -> Path:
    """A hub model's files in huggingface_hub's cache, asked for once per process however often a run resolves it
    (its config, tokenizer and weights are each looked up by name)."""
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "original/tokenizer.model", "*.jinja"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))
