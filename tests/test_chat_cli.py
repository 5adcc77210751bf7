"""python -m elo.chat: a conversation through the chat template, fed by piped input; commands; one-line errors."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import elo.chat
import elo.tools.cli
import elo.evaluation.generate
from elo.data.chat_templates import render_chat
from elo.evaluation.generate import answer_text
from elo.hf.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_model(tiny_with_tokenizer, tmp_path_factory):
    """The tiny SmolLM2-vocabulary Llama with larger weights: confident, varied answers rather than an instant stop."""
    from safetensors.torch import load_file, save_file

    directory = tmp_path_factory.mktemp("chat-model")
    shutil.copytree(tiny_with_tokenizer, directory, dirs_exist_ok=True)
    weights = load_file(directory / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({name: (1 + 0.2 * torch.randn(t.shape, generator=g)) if name.endswith("norm.weight")
               else 0.3 * torch.randn(t.shape, generator=g) for name, t in weights.items()},
              directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def chat(model_dir: Path, lines: list[str], monkeypatch, *args: str) -> list[tuple[list[int], list[int]]]:
    """Run the chat command on `lines` as piped input; (prompt ids, answer ids) of every answer it decoded."""
    calls = []
    real_stream = elo.evaluation.generate.stream

    def spy(model, prompts, *a, **k):
        tokens = []
        calls.append((list(prompts[0]), tokens))
        for i, token in real_stream(model, prompts, *a, **k):
            tokens.append(token)
            yield i, token

    monkeypatch.setattr(elo.chat, "stream", spy)  # where the chat command looks it up
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    elo.chat.main(["--model", str(model_dir), "--max-new-tokens", "12", *args])
    return calls


def test_second_answer_sees_the_first_and_commands_work(chat_model, monkeypatch, capsys):
    tok = load_tokenizer(chat_model)
    calls = chat(chat_model, ["Hello there", "What did I just say?", "/reset", "  Again  ", "/system",
                                       "/system Be brief.", "Hi", "/nope", "/exit", "never asked"], monkeypatch)
    assert len(calls) == 4
    answers = [answer_text(tok, tokens) for _, tokens in calls]
    assert any(answers) and all(len(tokens) <= 12 for _, tokens in calls)
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    conversations = [
        [user("Hello there")],
        [user("Hello there"), {"role": "assistant", "content": answers[0]}, user("What did I just say?")],
        [user("Again")],  # /reset forgot the first exchange
        [{"role": "system", "content": "Be brief."}, user("Hi")],
    ]
    for (prompt, _), messages in zip(calls, conversations):
        assert prompt == tok.encode(render_chat(tok, messages))
    out, err = capsys.readouterr()
    assert all(a in out for a in answers) and out.count("\n") >= 4  # each answer streamed, then a newline
    assert "usage: /system TEXT" in err and "unknown command /nope" in err


def test_one_shot_prompt_and_sampling_options(chat_model, monkeypatch, capsys):
    calls = chat(chat_model, ["not read"], monkeypatch, "--prompt", "Hi", "--temperature", "0.7",
                 "--top-p", "0.9")
    assert len(calls) == 1 and capsys.readouterr().out.endswith("\n")


@pytest.mark.slow  # a fresh interpreter imports torch
def test_the_command_line_end_to_end(chat_model):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-m", "elo.chat", "--model", str(chat_model),
                          "--max-new-tokens", "4"], input="Hello\n/reset\nHi again\n", capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("\n") >= 2 and "error" not in run.stderr


def test_bad_input_is_a_one_line_error(tiny_with_tokenizer, tmp_path, capsys):
    no_template = tmp_path / "base"
    shutil.copytree(tiny_with_tokenizer, no_template)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    for argv, message in [
        (["--model", str(tmp_path / "missing")], "neither a local directory"),
        (["--model", str(no_template)], "has no chat template; expected an instruct (chat) model"),
        (["--model", str(tiny_with_tokenizer), "--top-p", "0"], "0 < --top-p <= 1"),
    ]:
        with pytest.raises(SystemExit) as e:
            elo.tools.cli.run_main(elo.chat.main, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
