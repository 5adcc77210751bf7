"""A run directory: the run's arguments, its metrics log and its resumable train-state checkpoints.

    out/train_config.json     the arguments (written once training starts; `--resume` must repeat them)
    out/metrics.jsonl         one JSON record per step (and per evaluation), never a step twice
    out/checkpoints/step_N/   model + optimizer (torch.distributed.checkpoint), data position, RNG per rank
    out/model/                the final HF model (its presence means the run finished)

Checkpoints are written to a hidden `.tmp-step_N` and renamed when complete; the newest `keep` are kept, and a
damaged newest one falls back to the one before, with a warning.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from elo.train import distributed
from elo.train.loggers import Logger
from elo.tools.files import LOCK, MARKER, atomic_write_text, fsync_dir, fsync_tree, is_temp

CONFIG_NAME = "train_config.json"
METRICS_NAME = "metrics.jsonl"
# what a stage may write into --out before its run record exists: a rerun redoes it, so it does not make --out "taken"
BEFORE_RECORD = {"checkpoints", "spliced", "chat_vector", LOCK}


# The only classes a train-state checkpoint's metadata pickle names. Resuming reads a run directory that may come
# from someone else: anything else in it is refused, never imported or called.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "ChunkStorageMetadata",
                                              "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                          torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of a checkpoint's metadata")


class _SafeReader(dcp.FileSystemReader):
    """torch.distributed.checkpoint's reader, with the metadata read by an allow-list unpickler."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
            raise ValueError(f"{path}: refused to load ({e}); this checkpoint was not written by elo") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyperparameters, step counts) loaded as data only, never as arbitrary objects."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"checkpoint entry {read_item.dest_index.fqn}: refused to load ({str(e).splitlines()[0]})"
                             ) from None
        super().load_bytes(read_item, io.BytesIO(_to_bytes(loaded)))


def _to_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _finite(value):
    """JSON has no NaN: non-finite floats are written as null (the run stops on a non-finite loss anyway)."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


class RunDir:
    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.checkpoints = self.out / "checkpoints"
        self.metrics = self.out / METRICS_NAME
        self.model = self.out / "model"
        self.mirror: Logger | None = None  # --log: TensorBoard or wandb, fed every record metrics.jsonl gets

    # ---- the run's arguments ----

    def check(self, config: dict, resume: bool, volatile: set[str], defaults: dict | None = None) -> None:
        """Refuse an `--out` that holds something else, or a `--resume` with other arguments (keys in `volatile`
        may change; an option the saved run predates counts as its default). Cheap and read-only: call it before
        any expensive work."""
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file; expected a directory")
        saved = self.out / CONFIG_NAME
        if saved.is_file():
            if not resume:
                raise ValueError(f"--out {self.out} already holds a run; pass --resume to continue it "
                                 f"or choose another --out")
            try:
                theirs = json.loads(saved.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{saved} is not valid JSON ({e.msg}); it was not written by elo") from None
            mine = {k: v for k, v in config.items() if k not in volatile}
            theirs = {k: v for k, v in ({**(defaults or {}), **theirs}).items() if k not in volatile}
            diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            if diff:
                raise ValueError(f"--resume with different arguments than the run in {self.out}: "
                                 + ", ".join(f"{k}={mine.get(k)!r} (was {theirs.get(k)!r})" for k in diff))
        elif self.out.is_dir() and not resume and any(p.name not in BEFORE_RECORD and not is_temp(p.name)
                                                      for p in self.out.iterdir()):
            raise ValueError(f"--out {self.out} is not empty and holds no elo run; choose an empty or new directory")

    def start(self, config: dict) -> None:
        """Record the arguments: from here on the directory holds this run (called once training is set up)."""
        atomic_write_text(self.out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")

    @property
    def finished(self) -> bool:
        return (self.model / MARKER).is_file()

    # ---- metrics ----

    def log(self, record: dict) -> None:
        line = json.dumps({k: _finite(v) for k, v in record.items()}, allow_nan=False)
        with self.metrics.open("a") as f:
            f.write(line + "\n")
        if self.mirror is not None:
            self.mirror.log(record)

    def records(self) -> list[dict]:
        """The metrics records; a torn last line (a crash mid-write) is dropped."""
        if not self.metrics.is_file():
            return []
        lines = self.metrics.read_text().splitlines()
        out = []
        for i, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if i != len(lines) - 1:
                    raise ValueError(f"{self.metrics}:{i + 1}: not a JSON record; the metrics log is damaged") from None
        return out

    def truncate_metrics(self, step: int) -> None:
        """Keep only what a run resumed at `step` will not log again: records up to `step`, none when it is 0."""
        keep = [r for r in self.records() if step > 0 and r["step"] <= step]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in keep))

    # ---- train-state checkpoints ----

    def complete_checkpoints(self) -> list[Path]:
        return sorted(p for p in self.checkpoints.glob("step_*") if (p / "trainer_state.json").is_file())

    def clean_temps(self) -> None:
        for stale in self.checkpoints.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    def save(self, step: int, model: nn.Module, optimizer, source, d: distributed.Dist, tokens: int,
             keep: int) -> Path:
        """Model, optimizer, data position and RNG, written to a hidden directory that is renamed when complete;
        then all but the newest `keep` (0: all) are removed."""
        final = self.checkpoints / f"step_{step:08d}"
        tmp = self.checkpoints / f".tmp-step_{step:08d}"
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier(d)
        try:
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp, no_dist=not d.sharded)
            torch.save({"cpu": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                       tmp / f"rng_rank{d.rank}.pt")
            if d.main:
                state = {"step": step, "tokens": tokens, "data": source.state_dict(), "world_size": d.world_size}
                atomic_write_text(tmp / "trainer_state.json", json.dumps(state))
        except (OSError, RuntimeError, CheckpointException) as e:  # DCP wraps a full disk in a BaseException
            free = shutil.disk_usage(self.checkpoints).free / 1e9
            reason = next((str(exc) for exc, _ in e.failures.values()), str(e)) if isinstance(
                e, CheckpointException) else str(e)
            raise OSError(f"writing checkpoint {final} failed ({reason.splitlines()[0]}); {free:.2f} GB free on its "
                          f"filesystem") from None
        distributed.barrier(d)  # every rank's files are complete
        if d.main:
            fsync_tree(tmp)
            if final.exists():  # a damaged one that resuming fell back past
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.checkpoints)
            if keep > 0:
                for old in self.complete_checkpoints()[:-keep]:
                    shutil.rmtree(old)
        distributed.barrier(d)
        return final

    def load_latest(self, model: nn.Module, optimizer, source, d: distributed.Dist) -> dict | None:
        """Restore the newest complete checkpoint that loads, warning about damaged newer ones; None if none."""
        for path in reversed(self.complete_checkpoints()):
            try:
                return self._load(path, model, optimizer, source, d)
            except ValueError:  # a mismatch with this run, not damage
                raise
            except (Exception, CheckpointException) as e:  # what a truncated or corrupt file raises
                warnings.warn(f"checkpoint {path} is damaged ({type(e).__name__}: {e}); trying the one before")
        return None

    def _load(self, path: Path, model: nn.Module, optimizer, source, d: distributed.Dist) -> dict:
        state = json.loads((path / "trainer_state.json").read_text())
        if state["world_size"] != d.world_size:
            raise ValueError(f"checkpoint {path} was written by {state['world_size']} processes; "
                             f"resume with as many (--nproc_per_node {state['world_size']})")
        rng = torch.load(path / f"rng_rank{d.rank}.pt", weights_only=True)
        model_state, optim_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optim": optim_state}
        reader = _SafeReader(path)
        reader.read_metadata()  # here, not inside dcp.load, which would turn a refusal into "damaged, try another"
        try:
            dcp.load(loaded, storage_reader=reader, planner=_SafeLoadPlanner(), no_dist=not d.sharded)
        except CheckpointException as e:  # a refused entry is a one-line error, not damage to fall back past
            refused = [exc for exc, _ in e.failures.values() if isinstance(exc, ValueError)]
            if refused:
                raise refused[0] from None
            raise
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        source.load_state_dict(state["data"])
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
        state["path"] = path
        return state
