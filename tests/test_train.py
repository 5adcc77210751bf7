"""The training loop: 1 vs 2 processes (FSDP2 on gloo), frozen tensors, resume after SIGKILL, baselines, errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import elo
from elo.checkpoint import CheckpointReader
from elo.pretrain import TrainConfig, config_from_args, train
from elo.trainer import lr_at
from tests.conftest import DATA

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_env(tmp_path_factory, tiny_with_tokenizer):
    """A tiny random Llama with the real SmolLM2 tokenizer, small ko/en corpora from ../shared/data."""
    if not DATA.is_dir():
        pytest.skip("../shared/data is not present")
    root = tmp_path_factory.mktemp("train")
    shutil.copytree(tiny_with_tokenizer, root / "model")
    data = {}
    for lang, file in (("ko", "ko_wikipedia.jsonl"), ("en", "en_wikipedia.jsonl")):
        with open(DATA / "pretrain" / file, encoding="utf-8") as f:
            lines = [json.dumps({"text": json.loads(next(f))["text"][:3000]}) for _ in range(20)]
        data[lang] = root / f"{lang}.jsonl"
        data[lang].write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = dict(os.environ, ELO_CACHE=str(root / "cache"), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return root, data, env


def args(run_env, out, *extra):
    root, data, _ = run_env
    return ["--model", str(root / "model"), "--data", f"ko={data['ko']}", "--data", f"en={data['en']}",
            "--seq-len", "32", "--max-steps", "6", "--lr", "1e-3", "--warmup-steps", "2", "--out", str(out),
            "--val-tokens", "256", "--eval-batches", "2", *extra]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def run(cmd, env, **kw):
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_two_processes_match_one_and_only_chosen_layers_change(run_env, tmp_path):
    root, _, env = run_env
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, "train.py", *args(run_env, one, "--batch-size", "4", "--layers", "1,4")], env)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
         *args(run_env, two, "--batch-size", "2", "--layers", "1,4")], env)
    l1, l2 = losses(one), losses(two)
    assert sorted(l1) == list(range(1, 7)) and l1.keys() == l2.keys()
    assert max(abs(l1[s] - l2[s]) for s in l1) <= 1e-5
    assert l1[6] < l1[1]  # it learns
    # the saved submodel: a 2-layer HF model; only its decoder layers differ from the base
    base = CheckpointReader(root / "model")
    for out in (one, two):
        sub = CheckpointReader(out / "model")
        assert json.loads((out / "model" / "config.json").read_text())["elo"]["layers"] == [1, 4]
        for name in sub.keys():
            mem = elo.checkpoint.memory_name(name, elo.checkpoint.load_config(out / "model"))
            same = torch.equal(sub.get(name), base.get(mem))
            assert same == (not name.startswith("model.layers.")), name
    a, b = CheckpointReader(one / "model"), CheckpointReader(two / "model")
    assert all(torch.allclose(a.get(n), b.get(n), atol=1e-5) for n in a.keys())


KILLER = """
import os, signal, sys
import elo.pretrain, elo.run_dir as r
original = r.RunDir.save
def save_then_die(*args, **kwargs):
    path = original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
r.RunDir.save = save_then_die
elo.pretrain.main(sys.argv[1:])
"""


def test_resume_after_sigkill_matches_uninterrupted(run_env, tmp_path):
    _, _, env = run_env
    full, killed = tmp_path / "full", tmp_path / "killed"
    run([sys.executable, "train.py", *args(run_env, full, "--batch-size", "2")], env)
    cmd = args(run_env, killed, "--batch-size", "2", "--save-every", "3")
    died = subprocess.run([sys.executable, "-c", KILLER, *cmd], env=env, cwd=REPO, capture_output=True, timeout=600)
    assert died.returncode == -9
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["step_00000003"]
    assert not (killed / "model").exists()
    with pytest.raises(subprocess.CalledProcessError):  # same --out without --resume is refused
        subprocess.run([sys.executable, "train.py", *cmd], env=env, cwd=REPO, capture_output=True, check=True)
    resumed = run([sys.executable, "train.py", *cmd, "--resume"], env)
    assert "resumed from" in resumed.stdout
    lf, lk = losses(full), losses(killed)
    assert sorted(lk) == list(range(1, 7))  # every step logged exactly once
    assert abs(lf[6] - lk[6]) <= 1e-5
    assert all(abs(lf[s] - lk[s]) <= 1e-5 for s in lf)


def test_crash_during_checkpoint_write_is_not_resumed(run_env, tmp_path):
    """A checkpoint being written lives in a hidden directory; --resume ignores it and starts from the last whole one."""
    _, _, env = run_env
    out = tmp_path / "crash"
    killer = KILLER.replace("path = original(*args, **kwargs)",
                            "import torch.distributed.checkpoint as dcp\n"
                            "    if args[1] == 4:\n"
                            "        dcp.save = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
                            "    path = original(*args, **kwargs)\n    if args[1] == 4: return path")
    killer = killer.replace("    os.kill(os.getpid(), signal.SIGKILL)\nr.RunDir.save", "    return path\nr.RunDir.save")
    cmd = args(run_env, out, "--batch-size", "2", "--save-every", "2")
    died = subprocess.run([sys.executable, "-c", killer, *cmd], env=env, cwd=REPO, capture_output=True, timeout=600)
    assert died.returncode == -9
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".tmp-step_00000004", "step_00000002"]
    resumed = run([sys.executable, "train.py", *cmd, "--resume"], env)
    assert "step_00000002 at step 2" in resumed.stdout


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_baselines_train_and_save_full_models(run_env, tmp_path, monkeypatch, mode):
    root, _, env = run_env
    out = tmp_path / mode
    extra = ["--layers", "all"] if mode == "full" else ["--lora-rank", "4"]
    cfg = config_from_args(args(run_env, out, "--batch-size", "2", "--max-steps", "3", *extra))
    monkeypatch.setenv("ELO_CACHE", env["ELO_CACHE"])
    train(cfg)
    base, trained = CheckpointReader(root / "model"), CheckpointReader(out / "model")
    assert trained.keys() == base.keys()  # LoRA merged away: a plain HF model
    changed = {n for n in base.keys() if not torch.equal(base.get(n), trained.get(n))}
    if mode == "full":
        assert changed == set(base.keys())
    else:  # LoRA touches exactly the decoder linears
        assert changed == {n for n in base.keys() if n.startswith("model.layers.") and n.endswith("proj.weight")}


def test_lr_schedule():
    cfg = TrainConfig(out="x", lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


def test_bad_arguments(run_env, tmp_path, monkeypatch):
    monkeypatch.setenv("ELO_CACHE", run_env[2]["ELO_CACHE"])
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        train(config_from_args(args(run_env, tmp_path / "a", "--layers", "1,9")))
    with pytest.raises(ValueError, match="'ja'"):
        train(config_from_args(args(run_env, tmp_path / "b", "--mix", "en:1,ja:9")))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no elo run"):
        train(config_from_args(args(run_env, tmp_path / "c")))
    train(config_from_args(args(run_env, tmp_path / "d", "--max-steps", "1")))
    with pytest.raises(ValueError, match="different arguments.*lr=0.01"):
        train(config_from_args(args(run_env, tmp_path / "d", "--max-steps", "1", "--lr", "1e-2", "--resume")))
    with pytest.raises(ValueError, match="--seq-len 0: expected a positive integer"):
        train(config_from_args(args(run_env, tmp_path / "e", "--seq-len", "0")))


@pytest.mark.slow
def test_thirty_elo_steps_lower_heldout_korean_loss_on_default_model(tmp_path):
    """The real thing, small: SmolLM2-135M, layers 1 and 30, Korean + English at 9:1, 30 steps."""
    if not DATA.is_dir():
        pytest.skip("../shared/data is not present")
    data = {}
    for lang, file in (("ko", "ko_wikipedia.jsonl"), ("en", "en_wikipedia.jsonl")):
        with open(DATA / "pretrain" / file, encoding="utf-8") as f:
            data[lang] = tmp_path / f"{lang}.jsonl"
            data[lang].write_text("".join(next(f) for _ in range(150)), encoding="utf-8")
    out = tmp_path / "elo"
    cfg = config_from_args(["--layers", "1,30", "--data", f"ko={data['ko']}", "--data", f"en={data['en']}",
                            "--seq-len", "128", "--batch-size", "4", "--max-steps", "30", "--lr", "2e-4",
                            "--warmup-steps", "3", "--eval-every", "30", "--eval-batches", "4",
                            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before, after = records[0], records[-1]
    assert before["step"] == 0 and after["step"] == 30
    assert after["val_loss/ko"] < before["val_loss/ko"] - 0.05, (before, after)
    # the submodel splices back into the base checkpoint as a loadable 30-layer model
    spliced = elo.splice_checkpoint(elo.DEFAULT_MODEL, out / "model", tmp_path / "spliced")
    assert elo.load_model(spliced).config.num_hidden_layers == 30


@pytest.mark.parametrize("flag, steps, tol", [
    ("--activation-checkpointing", 3, 1e-6),
    pytest.param("--compile", 2, 1e-5, marks=pytest.mark.slow),  # compiled kernels fuse ops and round differently
])
def test_layer_wrappers_give_the_same_losses(run_env, tmp_path, monkeypatch, flag, steps, tol):
    monkeypatch.setenv("ELO_CACHE", run_env[2]["ELO_CACHE"])
    train(config_from_args(args(run_env, tmp_path / "plain", "--max-steps", str(steps))))
    train(config_from_args(args(run_env, tmp_path / "wrapped", "--max-steps", str(steps), flag)))
    plain, wrapped = losses(tmp_path / "plain"), losses(tmp_path / "wrapped")
    assert plain.keys() == wrapped.keys() and all(abs(plain[s] - wrapped[s]) <= tol for s in plain)
