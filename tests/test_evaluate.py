"""evaluate.py end to end: the results file holds what the library computes, --compare tabulates runs, bad input is
a one-line error before any model is loaded."""
from __future__ import annotations

import json

from pathlib import Path

import pytest

import elo
from elo.evaluation import evaluate
from elo.evaluation import scoring
from elo.evaluation import tasks
from elo.tools.cli import run_main
from elo.tools.jsonl import read_jsonl
from tests.conftest import SAMPLE, write_hub_cache

EVAL = SAMPLE / "eval"  # the bundled KoBEST COPA items


@pytest.fixture
def ppl_files(tmp_path):
    texts = {"ko": ["한국어 문장입니다. " * 6, "짧은 글"], "en": ["An English sentence. " * 5, "", "short"]}
    files = {}
    for lang, docs in texts.items():
        files[lang] = tmp_path / f"{lang}.jsonl"
        files[lang].write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), "utf-8")
    return texts, files


def test_results_file_holds_the_library_scores(tiny_with_tokenizer, ppl_files, tmp_path, capsys):
    texts, files = ppl_files
    out = tmp_path / "res" / "results.json"
    evaluate.main(["--model", str(tiny_with_tokenizer), "--ppl", f"ko={files['ko']}", "--ppl", f"en={files['en']}",
                   "--seq-len", "16", "--tasks", "kobest_copa", "--data-dir", str(EVAL), "--limit", "4",
                   "--out", str(out)])
    results = json.loads(out.read_text(encoding="utf-8"))
    model, tok = elo.load_model(tiny_with_tokenizer), elo.load_tokenizer(tiny_with_tokenizer)
    for lang in ("ko", "en"):
        assert results["perplexity"][lang] == pytest.approx(scoring.perplexity(model, tok, texts[lang], 16), rel=1e-6)
    assert results["tasks"] == scoring.evaluate_tasks(model, tok, ["kobest_copa"], EVAL, limit=4)
    assert results["settings"]["seq_len"] == 16 and results["settings"]["limit"] == 4
    assert set(results["data_files"]) == {str(files["ko"]), str(files["en"]), str(EVAL / "kobest" / "copa_test.jsonl")}
    assert all(len(digest) == 64 for digest in results["data_files"].values())
    printed = capsys.readouterr().out
    assert "| ppl ko | perplexity |" in printed and "| kobest_copa | f1 |" in printed and f"wrote {out}" in printed

    # --compare: one row per results file, only the columns some run has
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": "other", "tasks": {"kobest_copa": {"acc": 0.5, "f1": 0.25, "n": 4}}}))
    evaluate.main(["--compare", str(out), str(other)])
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == "| model | KoBEST copa F1 | ko bits/byte | en bits/byte |"
    f1 = results["tasks"]["kobest_copa"]["f1"]
    assert table[2].startswith(f"| {tiny_with_tokenizer} (results.json) | {100 * f1:.2f} | ")
    assert table[3] == "| other (other.json) | 25.00 | - | - |"


def cli(argv: list[str]) -> None:
    """evaluate.py as the command line runs it (elo.tools.cli.run_main around main)."""
    run_main(evaluate.main, argv)


def one_line_error(capsys, e) -> str:
    """The exit was a user error: status 2 and a single `error: ...` line on stderr, no traceback."""
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(elo, "load_model", lambda *a, **k: pytest.fail("the model must not load for bad input"))


@pytest.mark.parametrize("argv, message", [
    (["--ppl", "ko"], "--ppl 'ko': expected LANG=PATH"),
    (["--ppl", "ko=/nonexistent/ko.jsonl"], "--ppl ko: file /nonexistent/ko.jsonl not found"),
    (["--tasks", "kobest_nope"], "kobest_nope"),
    (["--tasks", "kobest_copa", "--data-dir", "/nonexistent"], "(is --data-dir /nonexistent right?)"),
    (["--generate", "mt_bench_xx"], "unknown --generate benchmark 'mt_bench_xx'"),
    (["--generate", "mt_bench", "--judge-url", "http://localhost:1"], "--judge-url needs --judge-model"),
    (["--generate", "mt_bench", "--gen-batch", "0"], "--gen-batch must be >= 1, got 0"),
    (["--generate", "mt_bench"], "--generate mt_bench reads its questions from --data-dir"),
    ([], "nothing to evaluate"),
    (["--compare", "/nonexistent/r.json"], "results file /nonexistent/r.json not found"),
])
def test_bad_input_is_a_one_line_error(argv, message, no_model, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--model", "unused", *argv])
    assert message in one_line_error(capsys, e)


# every numeric option against its range, --device and --out: checked before any file is read or model loaded
BAD_OPTIONS = [
    (["--max-docs", "-1"], "--max-docs -1: expected an integer >= 1"),
    (["--max-docs", "0"], "--max-docs 0: expected an integer >= 1"),
    (["--limit", "-1"], "--limit -1: expected an integer >= 1"),
    (["--seq-len", "0"], "--seq-len 0: expected an integer >= 1"),
    (["--batch-tokens", "0"], "--batch-tokens 0: expected an integer >= 1"),
    (["--num-fewshot", "-2"], "--num-fewshot -2: expected an integer >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: expected an integer >= 1"),
    (["--device", "gpu0"], "--device 'gpu0': not a device"),
    (["--out", "{tmp}"], "is a directory; expected a results file path"),
    (["--out", "{tmp}/file.txt/results.json"], "file.txt is a file, not a directory"),
    (["--out", "/sys/results.json"], "--out /sys/results.json: cannot write in /sys"),
]


@pytest.mark.parametrize("option, message", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_option_values(option, message, ppl_files, no_model, tmp_path, capsys):
    _, files = ppl_files
    (tmp_path / "file.txt").write_text("mine")
    before = sorted(tmp_path.rglob("*"))
    argv = ["--model", "unused", "--ppl", f"ko={files['ko']}", "--out", str(tmp_path / "r" / "results.json")]
    with pytest.raises(SystemExit) as e:
        cli(argv + [a.replace("{tmp}", str(tmp_path)) for a in option])
    err = one_line_error(capsys, e)
    assert message.replace("{tmp}", str(tmp_path)) in err and option[0] in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no output directory created


@pytest.mark.parametrize("argv, message", [
    (["--seq-len", "65"], "--seq-len 65 exceeds the model's context of 64 tokens"),
    (["--max-new-tokens", "64", "--generate", "mt_bench", "--data-dir", "."], "--max-new-tokens 64 leaves no room"),
    (["--ppl", "ko={en}"], "--ppl ko is given twice ({ko} and {en}); expected one file per language"),
    (["--ppl", "en={empty}"], "--ppl file {empty} has no text to score"),
    (["--ppl", "en={latin1}"], "{latin1}:2: not valid UTF-8"),
])
def test_bad_values_checked_against_the_model_and_files(argv, message, ppl_files, tiny_llama, no_model, tmp_path,
                                                         capsys):
    _, files = ppl_files
    names = dict(ko=files["ko"], en=files["en"], empty=tmp_path / "empty.jsonl", latin1=tmp_path / "latin1.jsonl")
    names["empty"].write_text("")
    names["latin1"].write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(SystemExit) as e:
        cli(["--model", str(tiny_llama[0]), "--ppl", f"ko={files['ko']}", "--out", str(tmp_path / "res.json"),
             *[a.format(**names) for a in argv]])
    assert message.format(**names) in one_line_error(capsys, e)
    assert not (tmp_path / "res.json").exists()


def test_tasks_read_from_the_hub_score_as_from_the_data_dir(tiny_with_tokenizer, offline_hub, tmp_path):
    """No --data-dir: KoBEST COPA from a Hugging Face cache of the Hub's parquet export (made from the bundled items,
    in the Hub's columns) gives the results the bundled JSONL files give."""
    copa = [{k: v for k, v in r.items() if k != "id"} for _, r in read_jsonl(EVAL / "kobest" / "copa_test.jsonl")]
    write_hub_cache(offline_hub, tasks.KOBEST, {"copa/test/0000.parquet": copa})
    common = ["--model", str(tiny_with_tokenizer), "--tasks", "kobest_copa", "--limit", "4"]
    evaluate.main([*common, "--out", str(tmp_path / "hub.json")])
    evaluate.main([*common, "--data-dir", str(EVAL), "--out", str(tmp_path / "dir.json")])
    hub, data_dir = (json.loads((tmp_path / f).read_text()) for f in ("hub.json", "dir.json"))
    assert hub["tasks"] == data_dir["tasks"] and hub["tasks"]["kobest_copa"]["n"] == 4
    assert [Path(f).parent.parent.name for f in hub["data_files"]] == ["copa"]  # the cached parquet shard


def test_uncached_hub_dataset_offline_is_a_one_line_error_before_the_model_loads(offline_hub, no_model, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--model", "unused", "--tasks", "kobest_copa"])
    err = one_line_error(capsys, e)
    assert "Hub dataset skt/kobest_v1 (copa/test/*.parquet" in err and "pass --data-dir DIR" in err


def test_command_line_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    import subprocess
    import sys

    script = [sys.executable, str(Path(__file__).resolve().parents[1] / "evaluate.py"), "--ppl", f"ko={tmp_path}/nope.jsonl"]
    done = subprocess.run(script, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr == f"error: --ppl ko: file {tmp_path}/nope.jsonl not found\n"
    done = subprocess.run(script + ["--debug"], capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" in done.stderr and "FileNotFoundError" in done.stderr


def test_table_printed_before_the_write(tiny_with_tokenizer, ppl_files, tmp_path, monkeypatch, capsys):
    """A write that fails at the end (disk full) still leaves the results on screen."""
    _, files = ppl_files

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate, "atomic_write_text", disk_full)
    with pytest.raises(SystemExit):
        cli(["--model", str(tiny_with_tokenizer), "--ppl", f"ko={files['ko']}", "--seq-len", "16",
             "--out", str(tmp_path / "results.json")])
    captured = capsys.readouterr()
    assert "| ppl ko | perplexity |" in captured.out and "No space left on device" in captured.err


def test_compare_rejects_a_file_that_is_not_json(tmp_path, capsys):
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as e:
        cli(["--compare", str(bad)])
    assert "r.json: not a results JSON" in one_line_error(capsys, e)


@pytest.mark.parametrize("content, message", [
    ('{"name": "a package.json"}', "not an elo results file"),
    ('[1, 2]', "not an elo results file"),
    ('{"model": "m", "tasks": {"kobest_copa": {"f1": "high"}}}', "'tasks.kobest_copa.f1' is 'high'; expected a number"),
    ('{"model": "m", "tasks": [1]}', "'tasks' is a list; expected an object"),
])
def test_compare_rejects_a_json_that_is_not_results(content, message, tmp_path, capsys):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"model": "m", "tasks": {"kobest_copa": {"acc": 0.5, "f1": 0.5, "n": 4}}}))
    bad.write_text(content)
    with pytest.raises(SystemExit) as e:
        cli(["--compare", str(good), str(bad)])
    err = one_line_error(capsys, e)
    assert str(bad) in err and message in err


def test_progress_prints_every_10_percent_and_5_seconds_and_at_the_end(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(evaluate.time, "monotonic", lambda: now[0])
    progress = evaluate.Progress("task x")
    for done, t in ((5, 1.0), (20, 2.0), (30, 6.0), (31, 8.0), (32, 70.0), (100, 71.0)):
        now[0] = t
        progress(done, 100)
    lines = capsys.readouterr().err.splitlines()
    # 20% at 2 s: too soon; 30% at 6 s: printed; 31%: neither 10% more nor 60 s; 32% at 70 s: 60 s passed; the end
    assert lines == ["task x: 30/100 requests (30%), elapsed 6s, eta 14s",
                     "task x: 32/100 requests (32%), elapsed 70s, eta 149s",
                     "task x: 100/100 requests (100%), elapsed 71s, eta 0s"]
