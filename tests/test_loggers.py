"""--log tensorboard / wandb: every numeric field of metrics.jsonl reaches the logger, at its step."""
import importlib.util
import json
import subprocess
import sys
import types

import pytest

from elo.train import loggers

from .test_train import REPO, args, run


def test_tensorboard_event_file_carries_the_loss(run_env, tmp_path):
    pytest.importorskip("tensorboard", reason="--log tensorboard needs the tensorboard package (in the dev extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, env = run_env
    out = tmp_path / "r"
    run([sys.executable, "train.py", *args(run_env, out, "--max-steps", "3", "--log", "tensorboard")], env)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {"loss", "lr", "val_loss/ko", "tokens_per_s"} <= set(events.Tags()["scalars"])
    logged = {e.step: e.value for e in events.Scalars("loss")}
    assert logged == pytest.approx({r["step"]: r["loss"] for r in records if "loss" in r}, rel=1e-6)


def test_wandb_gets_every_numeric_field_at_its_step(monkeypatch, tmp_path):
    calls = []
    fake_run = types.SimpleNamespace(log=lambda data, step: calls.append((step, data)),
                                     finish=lambda: calls.append("finish"))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or fake_run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = loggers.open_logger("wandb", tmp_path / "r", "elo", {"lr": 1e-3})
    logger.log({"step": 2, "loss": 1.5, "lr": 1e-3, "mfu": None, "val_loss/ko": 2.0})
    logger.close()
    assert calls[0][0] == "init" and calls[0][1]["config"] == {"lr": 1e-3} and calls[0][1]["dir"].endswith("wandb")
    assert calls[1:] == [(2, {"loss": 1.5, "lr": 1e-3, "val_loss/ko": 2.0}), "finish"]


@pytest.mark.parametrize("kind, message", [("mlflow", "--log 'mlflow': expected one of tensorboard, wandb"),
                                           ("wandb", "--log wandb needs the wandb package: pip install wandb")])
def test_bad_log_is_a_one_line_error(run_env, tmp_path, kind, message):
    _, _, env = run_env
    if kind == "wandb" and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: its missing-package error cannot show")
    result = subprocess.run([sys.executable, "train.py", *args(run_env, tmp_path / "r", "--log", kind)], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {message}"
