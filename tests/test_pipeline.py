"""pipeline.py: a recipe end to end (report numbers = evaluate.py rerun on the stage outputs), resume after a SIGKILL
mid-stage (same report as an uninterrupted run), --dry-run on every recipe in recipes/ without the hub, one-line
errors for bad recipes, and --ppl-heldout scoring exactly the held-out tokens of a run."""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a backport (setup.py installs it there)
    import tomli as tomllib

from elo.evaluation import evaluate
from elo.pipeline import run as pipeline
from elo.evaluation import scoring
from elo.tools.cli import parse_config, run_main
from elo.pipeline.recipe import CONFIGS, plan
from elo.data.text import Corpus, tokenize_files
from elo.pipeline.report import write_report
from tests.conftest import DATA, SAMPLE

REPO = Path(__file__).resolve().parents[1]
SEQ, VAL_TOKENS = 32, 97  # 3 held-out windows of 32 per language

BASE = """
model = "{model}"
[data.ko]
pretrain = "ko.jsonl"
sft = "ko_chat.jsonl"
[data.en]
pretrain = "en.jsonl"
sft = "en_chat.jsonl"
[train]
layers = "1,4"
seq_len = 32
batch_size = 2
max_steps = 6
lr = 1e-3
warmup_steps = 1
val_tokens = 97
eval_every = 3
eval_batches = 2
save_every = 2
cache_dir = "cache"
[align]
lr = 1e-3
warmup_steps = 1
eval_batches = 2
save_spliced = true
"""
REST = """
[control]
[chat_vector]
base = "{model}"
instruct = "{model}"
ratio = 0.5
[sft]
seq_len = 64
batch_size = 2
max_steps = 3
lr = 1e-3
warmup_steps = 1
eval_batches = 1
save_every = 1
[fft]
lr = 1e-3
[lora]
lora_rank = 4
[evaluate]
tasks = ["kobest_copa"]
limit = 6
data_dir = "{eval_dir}"
"""


@pytest.fixture(scope="module")
def recipe(tiny_with_tokenizer, tmp_path_factory) -> Path:
    """A quickstart-shaped recipe (every stage) over a tiny random model with SmolLM2's tokenizer and tiny data (cut
    from the bundled sample)."""
    root = tmp_path_factory.mktemp("pipeline")
    for lang, file in (("ko", "ko_wikipedia.jsonl"), ("en", "en_wikipedia.jsonl")):
        with open(SAMPLE / "pretrain" / file, encoding="utf-8") as f:
            lines = [json.dumps({"text": json.loads(next(f))["text"][:1500]}) for _ in range(12)]
        (root / f"{lang}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for lang, file in (("ko", "ko_chatbot_data.jsonl"), ("en", "en_self_instruct_seed_tasks.jsonl")):
        with open(SAMPLE / "sft" / file, encoding="utf-8") as f:
            (root / f"{lang}_chat.jsonl").write_text("".join(next(f) for _ in range(40)), encoding="utf-8")
    path = root / "recipe.toml"
    path.write_text((BASE + REST).format(model=tiny_with_tokenizer, eval_dir=SAMPLE / "eval"), encoding="utf-8")
    # the same train and align stages alone, evaluating only align (for the interruption test)
    (root / "short.toml").write_text((BASE + '[evaluate]\nmodels = ["align"]\ntasks = ["kobest_copa"]\nlimit = 6\n'
                                      'data_dir = "{eval_dir}"\n').format(model=tiny_with_tokenizer,
                                                                          eval_dir=SAMPLE / "eval"), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished(recipe) -> Path:
    out = recipe.parent / "out"
    pipeline.main([str(recipe), "--out", str(out)])
    return out


def _metrics(report: dict) -> dict:
    """What must not depend on timing or interruption: every stage's losses, tokens, steps; every evaluation."""
    stages = {n: {k: s.get(k) for k in ("steps", "tokens", "final_loss", "val_loss")} for n, s in report["stages"].items()}
    evals = {n: {k: e[k] for k in ("heldout", "tasks")} for n, e in report["evaluation"].items()}
    return {"stages": stages, "evaluation": evals}


@pytest.mark.slow
def test_end_to_end_report_equals_evaluate_rerun(finished, tmp_path):
    report = json.loads((finished / "report.json").read_text())
    assert list(report["stages"]) == ["train", "align", "control", "chat_vector", "sft", "fft", "lora"]
    assert list(report["evaluation"]) == ["base", "train", "align", "control", "chat_vector", "sft", "fft", "lora"]
    # the control: alignment's run on the base alone, the same tokens, steps and held-out windows
    assert {k: report["stages"]["control"][k] for k in ("steps", "tokens")} == \
        {k: report["stages"]["align"][k] for k in ("steps", "tokens")}
    assert json.loads((finished / "control" / "train_config.json").read_text())["control"] is True
    assert report["figures"] == ["loss.png", "comparison.png"] and (finished / "loss.png").is_file()
    for name in ("train", "align", "control", "sft", "fft", "lora"):
        s = report["stages"][name]
        assert s["tokens"] > 0 and s["tokens_per_s"] > 0 and s["wall_s"] >= s["train_s"] > 0
    assert report["stages"]["train"]["tokens"] == 6 * 2 * SEQ
    # the baselines read ELO's tokens plus alignment's (1/9 of 384 = 42, one more step of 2 x 32)
    assert report["stages"]["fft"]["steps"] == report["stages"]["lora"]["steps"] == 6 + 1
    # every reported evaluation number is what its recorded command gives when run again
    for name, e in report["evaluation"].items():
        argv = shlex.split(e["command"])[2:]
        argv[argv.index("--out") + 1] = str(tmp_path / f"{name}.json")
        evaluate.main(argv)
        again = json.loads((tmp_path / f"{name}.json").read_text())
        assert {lang: {k: r[k] for k in ("perplexity", "nll_per_token", "tokens")}
                for lang, r in again["heldout"].items()} == e["heldout"]
        assert again["tasks"] == e["tasks"]
    # held-out perplexity is the runs' own validation: the final val loss of a run over all 3 held-out windows
    # (eval_batches 2 x batch 2 >= 3) equals the scored NLL of its exported model (fp32; summation order differs)
    for name in ("align", "fft", "lora"):
        for lang in ("ko", "en"):
            assert report["evaluation"][name]["heldout"][lang]["nll_per_token"] == pytest.approx(
                report["stages"][name]["val_loss"][f"val_loss/{lang}"], abs=1e-5)
    # rerunning skips every finished stage and evaluation and writes the same report
    pipeline.main([str(finished.parent / "recipe.toml"), "--out", str(finished)])
    assert _metrics(json.loads((finished / "report.json").read_text())) == _metrics(report)


@pytest.mark.slow
def test_changed_recipe_is_refused_before_any_work(finished, recipe, tmp_path, capsys):
    changed = recipe.parent / "changed.toml"
    changed.write_text(recipe.read_text().replace("[align]\nlr = 1e-3", "[align]\nlr = 2e-3"))
    before = (finished / "report.json").read_text()
    with pytest.raises(SystemExit):
        run_main(pipeline.main, [str(changed), "--out", str(finished)])
    err = capsys.readouterr().err
    assert f"error: stage align in {finished / 'align'} ran with other arguments" in err
    assert "lr=0.002 (was 0.001)); run it again with --from align" in err
    assert (finished / "report.json").read_text() == before


@pytest.mark.slow
def test_report_without_matplotlib(finished, recipe, tmp_path, monkeypatch):
    copy = tmp_path / "out"
    shutil.copytree(finished, copy)
    for png in copy.glob("*.png"):
        png.unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    p = pipeline.plan(recipe, copy)
    write_report(p, json.loads((copy / "timings.json").read_text()))
    report = json.loads((copy / "report.json").read_text())
    assert report["figures"] == [] and not list(copy.glob("*.png"))
    assert "## Figures" not in (copy / "report.md").read_text() and "| sft |" in (copy / "report.md").read_text()
    assert _metrics(report) == _metrics(json.loads((finished / "report.json").read_text()))


KILLER = """
import os, signal, sys
from elo.train import run_dir
from elo.tools.cli import run_main
from elo.pipeline.run import main

log = run_dir.RunDir.log
def log_then_die(self, record):  # SIGKILL mid-stage: train step 5 logged, its newest checkpoint is step 4
    log(self, record)
    if self.out.name == "train" and record.get("step") == 5 and "loss" in record:
        os.kill(os.getpid(), signal.SIGKILL)
run_dir.RunDir.log = log_then_die
run_main(main, sys.argv[1:])
"""


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_resumes(finished, recipe, tmp_path, capsys):
    """The train and align stages of the full recipe alone: killed in train, rerun, they end as uninterrupted."""
    out, short = tmp_path / "out", recipe.parent / "short.toml"
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(killer), str(short), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "train" / "model").exists() and (out / "train" / "checkpoints" / "step_00000004").is_dir()
    pipeline.main([str(short), "--out", str(out)])
    steps = [r["step"] for r in map(json.loads, (out / "train" / "metrics.jsonl").read_text().splitlines())]
    assert steps == [0, 1, 2, 3, 4, 5, 6]  # step 5 logged once, though it ran twice
    resumed, uninterrupted = (_metrics(json.loads((d / "report.json").read_text())) for d in (out, finished))
    assert resumed["stages"] == {s: uninterrupted["stages"][s] for s in ("train", "align")}
    assert resumed["evaluation"]["align"] == uninterrupted["evaluation"]["align"]
    # --from align: train is kept, align and the evaluation run again, to the same numbers
    capsys.readouterr()
    pipeline.main([str(short), "--out", str(out), "--from", "align"])
    printed = capsys.readouterr().out
    assert "stage train: finished earlier" in printed and f"--from align: removing {out / 'align'}" in printed
    assert _metrics(json.loads((out / "report.json").read_text())) == resumed


@pytest.mark.slow
def test_two_processes_run_under_torchrun_like_one(finished, recipe, tmp_path, capsys):
    """nproc = 2: each stage is the torchrun command it prints; with half the micro-batch per process the two ranks
    see the single-process run's batches, so losses and held-out perplexity agree (FSDP2 sums in another order)."""
    short = (recipe.parent / "short.toml").read_text()
    two = recipe.parent / "two.toml"
    # half of each micro-batch per process (align's default is 4); eval_batches 4 still covers the 3 held-out windows
    two.write_text("nproc = 2\n" + short.replace("batch_size = 2", "batch_size = 1").replace("save_every = 2\n", "")
                   .replace("eval_batches = 2", "eval_batches = 4").replace("[align]\n", "[align]\nbatch_size = 2\n"))
    out = tmp_path / "out"
    pipeline.main([str(two), "--out", str(out)])
    assert "torchrun --standalone --nproc_per_node 2 " in capsys.readouterr().out
    two_procs, one = (_metrics(json.loads((d / "report.json").read_text())) for d in (out, finished))
    for stage in ("train", "align"):
        a, b = two_procs["stages"][stage], one["stages"][stage]
        assert (a["steps"], a["tokens"]) == (b["steps"], b["tokens"])
        assert a["final_loss"] == pytest.approx(b["final_loss"], abs=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
    for lang, r in two_procs["evaluation"]["align"]["heldout"].items():
        assert r["nll_per_token"] == pytest.approx(one["evaluation"]["align"]["heldout"][lang]["nll_per_token"],
                                                   abs=1e-4)


@pytest.fixture
def no_hub(monkeypatch):
    """Dry runs plan and check offline: hub ids are never downloaded (the hub is made to fail)."""
    import huggingface_hub

    def fail(*args, **kwargs):
        raise AssertionError("--dry-run tried to download from the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)


def dry_run(recipe: Path, out: Path, capsys) -> None:
    pipeline.main([str(recipe), "--dry-run", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "dry run: every stage checked" in printed and ".py" in printed, recipe
    assert not out.exists()  # a dry run writes nothing


def test_quickstart_dry_run_reads_only_the_bundled_sample(no_hub, tmp_path, capsys):
    """What a fresh clone has is enough: every data path of the quickstart is inside the repository."""
    quickstart = REPO / "recipes" / "quickstart.toml"
    dry_run(quickstart, tmp_path / "quickstart", capsys)
    recipe = tomllib.loads(quickstart.read_text(encoding="utf-8"))
    paths = [path for files in recipe["data"].values() for path in files.values()] + [recipe["evaluate"]["data_dir"]]
    assert all((quickstart.parent / path).resolve().is_relative_to(REPO / "examples" / "data") for path in paths)


def test_dry_run_on_every_recipe(no_hub, offline_hub, tmp_path, capsys):
    """The paper recipes read Hub datasets: offline, with an empty cache, the dry run says which it could not check
    and checks everything else."""
    recipes = sorted((REPO / "recipes").glob("*.toml"))
    assert {r.name for r in recipes} >= {"quickstart.toml", "llama3.1-8b-ko.toml", "mistral-7b-v0.3-ko.toml",
                                         "qwen2-7b-ko.toml", "llama3.1-8b-ja.toml"}
    for r in recipes:
        pipeline.main([str(r), "--dry-run", "--out", str(tmp_path / r.stem)])
        printed = capsys.readouterr().out
        assert "dry run: every stage checked" in printed and not (tmp_path / r.stem).exists(), r
        if r.name != "quickstart.toml":
            assert "note: data.en.pretrain: hf://datasets/wikimedia/wikipedia/20231101.en/*.parquet?tokens=400M is " \
                   "not in the local Hugging Face cache: not checked offline" in printed, r
            assert "is not in the local Hugging Face cache: not checked offline" in printed.split("== stage evaluate")[1]
    if not DATA.is_dir():
        pytest.skip("../shared/data is not present: the study recipes train on it (the paper recipes were checked)")
    study = sorted((REPO / "studies").glob("*/recipes/*.toml"))
    assert len(study) >= 10
    for r in study:
        dry_run(r, tmp_path / r.parent.parent.name / r.stem, capsys)


def test_each_printed_command_parses_back_to_the_config_that_runs(no_hub, offline_hub, tmp_path):
    """The pipeline holds each stage as a config object and runs that; the printed command line is derived from it
    and its script must read it back as the same config, for every recipe (and every option the recipes set)."""
    for r in sorted((REPO / "recipes").glob("*.toml")):
        p = plan(r, tmp_path / r.stem)
        for name, stage in p.stages.items():
            if stage.config is not None:
                assert parse_config(CONFIGS[name], stage.argv, name) == stage.config, (r.name, name)
                assert stage.argv[-2:] == ["--out", str(stage.out)]


def test_dry_run_resolves_a_cached_hub_dataset(no_hub, offline_hub, tmp_path, capsys):
    """A Hub dataset the cache holds is resolved before any work: its commit and shard count are printed."""
    import pyarrow
    import pyarrow.parquet

    repo, commit = offline_hub / "datasets--wikimedia--wikipedia", "c" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for i in range(2):
        shard = repo / "snapshots" / commit / "20231101.ko" / f"train-{i}.parquet"
        shard.parent.mkdir(parents=True, exist_ok=True)
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{"text": "안녕하세요 " * 50}] * 4), shard)
    pipeline.main([str(REPO / "recipes" / "llama3.1-8b-ko.toml"), "--dry-run", "--out", str(tmp_path / "r")])
    printed = capsys.readouterr().out
    assert (f"note: data.ko.pretrain: hf://datasets/wikimedia/wikipedia/20231101.ko/*.parquet at commit {commit}, "
            f"2 shard(s)") in printed


BAD = [
    ("colour = 1\n", "recipe key colour: unknown"),
    ("[train]\nlayers = \"1,4\"\n[trian]\nx = 1\n", "recipe key trian: unknown"),
    ("[data.ko]\npretrain = \"ko.jsonl\"\n[train]\nlayer = \"1,4\"\n", "recipe key train.layer: unknown"),
    ("[data.ko]\npretrain = \"ko.jsonl\"\n[train]\nmax_steps = \"ten\"\n", "recipe key train.max_steps: 'ten' is not an integer"),
    ("[data.ko]\npretrain = \"missing.jsonl\"\n[train]\n", "recipe key data.ko.pretrain: file"),
    ("[data.ko]\npretrain = \"ko.jsonl\"\n[align]\n", "recipe key align: the align stage needs the train stage"),
    ("[data.ko]\npretrain = \"ko.jsonl\"\n[train]\n[align]\n[sft]\nmax_steps = 2\n",
     "recipe key data: no language has sft files, which the sft stage needs"),
    ("[data.ko]\npretrain = \"ko.jsonl\"\n[train]\ndata = \"x\"\n", "recipe key train.data: is set by the pipeline"),
    ("[data.ko]\npretrain = \"ko.jsonl\"\n[train]\n[lora]\nlr = 1e-4\n", "recipe key lora.lora_rank: missing"),
    ("[data.ko]\npretrain = \"ko.jsonl\"\n[train]\n[fft]\nmax_steps = 9\n", "recipe key fft.max_steps: the baselines run"),
    ("[data.ko]\npretrain = \"ko.jsonl\"\n[train]\n[fft]\nbatch_size = 8\n",
     "recipe key fft.batch_size: batch_size * grad_accum must equal [train]'s"),
    ("[data.ko]\npretrain = \"ko.jsonl\"\n[train]\n[evaluate]\nmodels = [\"sft\"]\n",
     "recipe key evaluate.models: 'sft' names a stage the recipe does not run"),
    ("[data.ko]\npretrain = \"ko.jsonl\"\n[train]\n[evaluate]\nmodels = [\"train\"]\n",
     "recipe key evaluate.models: 'train' is the ELO submodel"),
    ("[data.ko]\npretrain = \"ko.jsonl\"\n[train]\n[align]\n[chat_vector]\nbase = \"b\"\n",
     "recipe key chat_vector.instruct: missing"),
    ("[data.ko]\npretrain = \"ko.jsonl\"\n[train]\nseq_len = 64\n[align]\nseq_len = 32\n",
     "recipe key align.seq_len: 32 differs from train.seq_len 64 on the same text"),
    ("[data.ko]\nsft = \"ko.jsonl\"\n[train]\n", "recipe key data: no language has pretrain files"),
    ("[data.ko]\npretrain = \"ko.jsonl\"\n[train\n", "not valid TOML"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m[:50] for _, m in BAD])
def test_bad_recipe_is_one_line_error(text, message, tmp_path, capsys):
    (tmp_path / "ko.jsonl").write_text('{"text": "안녕하세요"}\n', encoding="utf-8")
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        run_main(pipeline.main, [str(path), "--dry-run", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("align,steps", [("", 10 + 2), ("tokens = \"50%\"\n", 10 + 5),
                                         ("max_steps = 3\nbatch_size = 4\n", 10 + 6), (None, 10)])
def test_baselines_read_elo_plus_alignment_tokens(align, steps, tmp_path):
    """ELO: 10 steps of 2 x 32 = 640 tokens; alignment 1/9 of them (72 -> 2 steps of 64), 50% (320 -> 5 steps), or
    3 steps of 4 x 32 (384 -> 6 steps); without [align] the baselines read ELO's tokens only."""
    (tmp_path / "ko.jsonl").write_text('{"text": "안녕하세요"}\n', encoding="utf-8")
    text = ("[data.ko]\npretrain = \"ko.jsonl\"\n[train]\nseq_len = 32\nbatch_size = 2\nmax_steps = 10\n"
            + ("" if align is None else "[align]\n" + align) + "[fft]\n[lora]\nlora_rank = 4\n")
    (tmp_path / "r.toml").write_text(text, encoding="utf-8")
    p = pipeline.plan(tmp_path / "r.toml", tmp_path / "out")
    for name in ("fft", "lora"):
        argv = p.stages[name].argv
        assert argv[argv.index("--max-steps") + 1] == str(steps)


def test_from_names_a_stage_of_the_recipe(recipe, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_main(pipeline.main, [str(recipe.parent / "short.toml"), "--out", str(tmp_path / "out"), "--from", "sft"])
    assert "--from sft: not a stage of this recipe; its stages are train, align, evaluate" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ppl_heldout_scores_exactly_the_held_out_tokens(finished, tmp_path, monkeypatch, capsys):
    """The windows --ppl-heldout scores are the run's held-out windows, rebuilt independently from its token cache,
    and lie entirely after every training window."""
    import elo

    run = finished / "train"
    config = json.loads((run / "train_config.json").read_text())
    tokenizer = elo.load_tokenizer(config["model"])
    scored = []
    real = scoring.loglikelihoods

    def capture(model, requests, *args, **kwargs):
        scored.append([ctx + cont for ctx, cont in requests])
        return real(model, requests, *args, **kwargs)

    monkeypatch.setattr(scoring, "loglikelihoods", capture)
    evaluate.main(["--model", str(finished / "align" / "model"), "--ppl-heldout", str(run), "--tasks", "kobest_copa",
                   "--limit", "4", "--data-dir", str(SAMPLE / "eval"), "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err  # progress: per language, per task
    assert "held-out ko: 3/3 requests (100%)" in err and "task kobest_copa: 8/8 requests (100%)" in err
    scored = scored[:2]  # the held-out windows (then the task's requests)
    results = json.loads((tmp_path / "r.json").read_text())
    for (lang, files), windows in zip(sorted(config["data"].items()), scored):
        tokens, _, _ = tokenize_files(files, tokenizer, config["cache_dir"], config["text_field"])
        corpus = Corpus(lang, tokens, SEQ, VAL_TOKENS)
        split = len(tokens) - VAL_TOKENS
        expected = [tokens[split + i * SEQ: split + (i + 1) * SEQ + 1].tolist() for i in range(3)]
        assert windows == expected and corpus.num_val == 3
        # the last training window ends (exclusive) at num_train * SEQ + 1: no scored token is a training token
        assert corpus.num_train * SEQ + 1 <= split
        assert results["heldout"][lang]["tokens"] == 3 * SEQ
        # bits per byte: the same NLL over the UTF-8 bytes the scored targets decode to (models with other
        # tokenizers compare on it)
        h = results["heldout"][lang]
        n_bytes = sum(len(tokenizer.decode(w[1:]).encode("utf-8")) for w in expected)
        assert h["bytes"] == n_bytes and h["bits_per_byte"] == pytest.approx(
            h["nll_per_token"] * h["tokens"] / math.log(2) / n_bytes, rel=1e-12)
    assert results["heldout_run"] == str(run.resolve())


def test_ppl_heldout_refuses_a_non_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_main(evaluate.main, ["--ppl-heldout", str(tmp_path), "--out", str(tmp_path / "r.json")])
    assert "no train_config.json; expected a train.py or align.py run directory" in capsys.readouterr().err
