"""evaluate.py end to end: the results file holds what the library computes, --compare tabulates runs, bad input is
a one-line error before any model is loaded."""
from __future__ import annotations

import json

import pytest

import elo
import evaluate
from elo import scoring
from tests.conftest import DATA

EVAL = DATA / "eval"
needs_data = pytest.mark.skipif(not EVAL.is_dir(), reason=f"shared eval data not found under {EVAL}")


@pytest.fixture
def ppl_files(tmp_path):
    texts = {"ko": ["한국어 문장입니다. " * 6, "짧은 글"], "en": ["An English sentence. " * 5, "", "short"]}
    files = {}
    for lang, docs in texts.items():
        files[lang] = tmp_path / f"{lang}.jsonl"
        files[lang].write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), "utf-8")
    return texts, files


@needs_data
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


@pytest.mark.parametrize("argv, message", [
    (["--ppl", "ko"], "--ppl 'ko': expected LANG=PATH"),
    (["--ppl", "ko=/nonexistent/ko.jsonl"], "--ppl ko: file /nonexistent/ko.jsonl not found"),
    (["--tasks", "kobest_nope"], "kobest_nope"),
    (["--tasks", "kobest_copa", "--data-dir", "/nonexistent"], "(is --data-dir /nonexistent right?)"),
    (["--generate", "mt_bench_xx"], "unknown --generate benchmark 'mt_bench_xx'"),
    (["--generate", "mt_bench", "--judge-url", "http://localhost:1"], "--judge-url needs --judge-model"),
    (["--generate", "mt_bench", "--gen-batch", "0"], "--gen-batch must be >= 1, got 0"),
    ([], "nothing to evaluate"),
    (["--compare", "/nonexistent/r.json"], "results file /nonexistent/r.json not found"),
])
def test_bad_input_is_a_one_line_error(argv, message, monkeypatch):
    monkeypatch.setattr(elo, "load_model", lambda *a, **k: pytest.fail("the model must not load for bad input"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", "unused", *argv])
    assert str(e.value).startswith("evaluate.py: error: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_compare_rejects_a_file_that_is_not_json(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match=r"r.json: not a results JSON"):
        evaluate.main(["--compare", str(bad)])
