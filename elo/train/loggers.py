"""Experiment loggers beside metrics.jsonl (which stays the record of a run): TensorBoard through torch's own
SummaryWriter, and Weights & Biases. Each is an optional package, asked for by `--log` and checked before any work."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

LOGGERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --log value -> the package it needs


class Logger(Protocol):
    def log(self, record: dict) -> None: ...
    def close(self) -> None: ...


def check_logger(kind: str | None) -> None:
    """A one-line error for an unknown `--log` or a missing package, before any work."""
    if kind is None:
        return
    if kind not in LOGGERS:
        raise ValueError(f"--log {kind!r}: expected one of {', '.join(LOGGERS)}")
    if importlib.util.find_spec(LOGGERS[kind]) is None:
        raise ValueError(f"--log {kind} needs the {LOGGERS[kind]} package: pip install {LOGGERS[kind]}")


def _scalars(record: dict) -> dict[str, float]:
    """Every numeric field of a metrics record but the step itself (booleans and missing values left out)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger:
    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package

        self.writer = SummaryWriter(str(directory))

    def log(self, record: dict) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, directory: Path, name: str, config: dict):
        import wandb  # optional: needs the wandb package (WANDB_MODE=offline runs without network)

        self.wandb = wandb
        self.run = wandb.init(project="elo", name=name, dir=str(directory), config=config, resume="allow",
                              id=f"elo-{abs(hash(str(directory))):x}")

    def log(self, record: dict) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_logger(kind: str | None, out: Path, label: str, config: dict) -> Logger | None:
    """The `--log` logger of a run writing into `out` (TensorBoard: out/tensorboard; wandb: out/wandb)."""
    if kind == "tensorboard":
        return TensorBoardLogger(out / "tensorboard")
    if kind == "wandb":
        (out / "wandb").mkdir(parents=True, exist_ok=True)
        return WandbLogger(out / "wandb", f"{out.name}-{label}", config)
    return None
