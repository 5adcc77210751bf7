"""A run directory: the run's arguments, its metrics log and its resumable train-state checkpoints.

    out/train_config.json     the arguments (written once training starts; `--resume` must repeat them)
    out/metrics.jsonl         one JSON record per step (and per evaluation), never a step twice
    out/checkpoints/step_N/   model + optimizer (torch.distributed.checkpoint), data position, RNG per rank
    out/model/                the final HF model (its presence means the run finished)

Checkpoints are written to a hidden `.tmp-step_N` and renamed when complete; the newest `keep` are kept, and a
damaged newest one falls back to the one before, with a warning.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from elo.train import distributed
from elo.tools.files import MARKER, atomic_write_text, fsync_dir, fsync_tree

CONFIG_NAME = "train_config.json"
METRICS_NAME = "metrics.jsonl"


def _finite(value):
    """JSON has no NaN: non-finite floats are written as null (the run stops on a non-finite loss anyway)."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


class RunDir:
    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.checkpoints = self.out / "checkpoints"
        self.metrics = self.out / METRICS_NAME
        self.model = self.out / "model"

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
        elif self.out.is_dir() and any(p.name != "checkpoints" for p in self.out.iterdir()) and not resume:
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
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

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
        except (OSError, RuntimeError) as e:
            free = shutil.disk_usage(self.checkpoints).free / 1e9
            raise OSError(f"writing checkpoint {final} failed ({e}); {free:.2f} GB free on its filesystem") from e
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
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        for path in reversed(self.complete_checkpoints()):
            try:
                return self._load(path, model, optimizer, source, d)
            except ValueError:  # a mismatch with this run, not damage
                raise
            except (Exception, CheckpointException) as e:  # what a truncated or corrupt file raises
                warnings.warn(f"checkpoint {path} is damaged ({type(e).__name__}: {e}); trying the one before")
        return None

    def _load(self, path: Path, model: nn.Module, optimizer, source, d: distributed.Dist) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        state = json.loads((path / "trainer_state.json").read_text())
        if state["world_size"] != d.world_size:
            raise ValueError(f"checkpoint {path} was written by {state['world_size']} processes; "
                             f"resume with as many (--nproc_per_node {state['world_size']})")
        rng = torch.load(path / f"rng_rank{d.rank}.pt", weights_only=True)
        model_state, optim_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=path, no_dist=not d.sharded)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        source.load_state_dict(state["data"])
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
        state["path"] = path
        return state
