"""sft.py on the shared loop: 1 vs 2 processes, resume after SIGKILL, the chat-vector path, epochs, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elo.hf.checkpoint import CheckpointReader
from elo.tools.cli import run_main
from elo.sft import main
from tests.conftest import SAMPLE, killer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chats(tmp_path_factory, tiny_with_tokenizer):
    root = tmp_path_factory.mktemp("sft")
    files = {}
    for lang, name in (("ko", "ko_chatbot_data.jsonl"), ("en", "en_self_instruct_seed_tasks.jsonl")):
        with open(SAMPLE / "sft" / name, encoding="utf-8") as f:
            files[lang] = root / f"{lang}.jsonl"
            files[lang].write_text("".join(next(f) for _ in range(40)), encoding="utf-8")
    return root, files, tiny_with_tokenizer


def sft_args(chats, out, *extra) -> list[str]:
    _, files, model = chats
    return ["--model", str(model), "--data", f"ko={files['ko']}", "--data", f"en={files['en']}", "--seq-len", "128",
            "--lr", "1e-3", "--warmup-steps", "1", "--val-conversations", "4", "--eval-batches", "2",
            "--out", str(out), *extra]


def run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_two_processes_match_one_and_the_output_is_a_chat_model(chats, tmp_path):
    import transformers

    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run([sys.executable, "sft.py", *sft_args(chats, one, "--max-steps", "3", "--batch-size", "4")])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "sft.py",
              *sft_args(chats, two, "--max-steps", "3", "--batch-size", "2")])
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys() == {1, 2, 3} and all(abs(a[s] - b[s]) <= 1e-5 for s in a)
    tok = transformers.AutoTokenizer.from_pretrained(one / "model")
    assert tok.chat_template  # the output is a chat model, template included
    transformers.AutoModelForCausalLM.from_pretrained(one / "model")


KILLER = killer("sft")


def test_resume_after_sigkill_matches_uninterrupted(chats, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = ("--max-steps", "4", "--batch-size", "2", "--save-every", "2")
    assert run([sys.executable, "sft.py", *sft_args(chats, full, *extra)]).returncode == 0
    assert run([sys.executable, "-c", KILLER, *sft_args(chats, killed, *extra)]).returncode == -9
    resumed = run([sys.executable, "sft.py", *sft_args(chats, killed, *extra, "--resume")])
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    a, b = losses(full), losses(killed)
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) <= 1e-5 for s in a)
    ra, rb = CheckpointReader(full / "model"), CheckpointReader(killed / "model")
    assert all(torch.allclose(ra.get(n), rb.get(n), atol=1e-5, rtol=0) for n in ra.keys())


def test_chat_vector_then_epochs(chats, tmp_path, monkeypatch):
    """With a chat vector the merged model is written to --out/chat_vector and training starts from it; --epochs
    sets the steps from the number of training conversations."""
    import shutil

    from elo.sft import SFTConfig, sft
    from elo.tools.cli import parse_config

    _, _, model = chats
    base = tmp_path / "base"
    shutil.copytree(model, base)  # instruct == base: a zero vector, so the merged model equals the model
    out = tmp_path / "run"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sft(parse_config(SFTConfig, sft_args(chats, out, "--epochs", "0.05", "--batch-size", "4",
                                         "--chat-vector-base", str(base), "--chat-vector-instruct", str(model)), ""))
    merged, original = CheckpointReader(out / "chat_vector"), CheckpointReader(model)
    assert all(torch.equal(merged.get(n), original.get(n)) for n in original.keys())
    steps = max(losses(out))
    assert steps == -(-0.05 * (36 + 36) // 4)  # 40 conversations per language, 4 held out each
    assert json.loads((out / "model" / "elo_run.json").read_text())["chat_vector"]["ratio"] == 1.0


@pytest.mark.parametrize("extra, message", [
    ((), "give the length of the run"),
    (("--epochs", "1", "--max-steps", "3"), "either --epochs or --max-steps"),
    (("--epochs", "0"), "--epochs 0"),
    (("--max-steps", "2", "--chat-vector-base", "x"), "needs both"),
    (("--max-steps", "2", "--val-conversations", "0"), "--val-conversations 0"),
])
def test_bad_input_is_one_line(chats, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as e:
        run_main(main, sft_args(chats, out, *extra))
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
