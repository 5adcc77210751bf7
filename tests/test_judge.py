"""elo.evaluation.judge against a small OpenAI-compatible server started in the test (http.server on 127.0.0.1)."""
from __future__ import annotations

import json
import re
import socket
import time
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from elo.evaluation.judge import endpoint, judge_answers, parse_rating

EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
needs_data = pytest.mark.skipif(not EVAL.is_dir(), reason="shared/data/eval not found beside the repo")
FAST = dict(retries=2, backoff_s=0.01, timeout_s=10.0)


def completion(text: str) -> dict:
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                          "content": text}}]}


class FakeJudge:
    """Records every request; `reply(body, n)` -> (HTTP status, JSON-able dict or raw bytes) decides the answer."""

    def __init__(self):
        self.requests: list[dict] = []
        self.reply = lambda body, n: (200, completion("Rating: [[5]]"))
        self.url = ""


@pytest.fixture
def judge():
    fake = FakeJudge()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            status, payload = fake.reply(body, len(fake.requests))
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def environment(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    for name in ("NO_PROXY", "no_proxy"):  # the local server must not be reached through a proxy
        monkeypatch.setenv(name, "127.0.0.1,localhost")


def questions(bench: str) -> list[dict]:
    from elo.evaluation.generate import load_questions

    return load_questions(bench, EVAL)


def write_answers(path: Path, bench: str, ids: list | None = None) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for q in questions(bench):
            if ids is None or q["question_id"] in ids:
                qid = q["question_id"]
                f.write(json.dumps({"question_id": qid, "answer_id": "a", "model_id": "m", "tstamp": 0.0,
                                    "choices": [{"index": 0, "turns": [f"answer one to {qid}",
                                                                       f"answer two to {qid}"]}]}) + "\n")
    return path


def asked(body: dict) -> tuple[int, int]:
    """(question id, turn) of a judge request, read back from the answers it quotes."""
    user = body["messages"][1]["content"]
    return int(re.search(r"answer one to (\d+)", user).group(1)), 2 if "answer two to" in user else 1


def score_of(qid: int, turn: int) -> float:
    return float((qid * 7 + turn) % 10 + 1)


def run(judge: FakeJudge, answers: Path, bench: str, **kw) -> dict:
    return judge_answers(answers, bench, EVAL, judge.url, "judge-1", api_key_env="TEST_JUDGE_KEY", **{**FAST, **kw})


def judgments(summary: dict) -> list[dict]:
    return [json.loads(line) for line in Path(summary["judgments"]).read_text().splitlines()]


def test_parse_rating_uses_fastchat_patterns_in_order():
    assert parse_rating("Rating: [[7]]") == 7
    assert parse_rating("評価：[[8.5]]") == 8.5
    assert parse_rating("Rating: [6]") == 6  # the backup pattern
    assert parse_rating("first [2], then [[9]]") == 9  # [[x]] wins over an earlier [x]
    assert parse_rating("[[3]] ... [[9]]") == 3
    assert parse_rating("[[0]]") == 0
    assert parse_rating("no rating at all") == -1
    assert parse_rating("[[ten]]") == -1


def test_endpoint_forms():
    want = "http://h:8/v1/chat/completions"
    assert endpoint("http://h:8") == endpoint("http://h:8/v1/") == endpoint(want) == want


@needs_data
def test_ratings_and_means(judge, tmp_path):
    """Both rating forms parsed; per-category, per-turn and overall means equal ones computed here."""
    def reply(body, n):
        qid, turn = asked(body)
        s = score_of(qid, turn)
        return 200, completion(f"Fine.\nRating: [[{s:g}]]" if qid % 2 else f"Fine. Score [{s:g}] out of 10")
    judge.reply = reply
    summary = run(judge, write_answers(tmp_path / "answers.jsonl", "mt_bench"), "mt_bench")

    qs = questions("mt_bench")
    assert summary["n_judged"] == 2 * len(qs) == 160 and summary["n_failed"] == 0 and summary["failures"] == []
    for cat in dict.fromkeys(q["category"] for q in qs):
        scores = [score_of(q["question_id"], t) for q in qs if q["category"] == cat for t in (1, 2)]
        assert summary["categories"][cat] == pytest.approx(sum(scores) / len(scores), abs=1e-4)
    all_scores = [score_of(q["question_id"], t) for q in qs for t in (1, 2)]
    assert summary["overall"] == pytest.approx(sum(all_scores) / len(all_scores), abs=1e-4)
    turn2 = [score_of(q["question_id"], 2) for q in qs]
    assert summary["turn_2"] == pytest.approx(sum(turn2) / len(turn2), abs=1e-4)
    for r in judgments(summary):
        assert r["score"] == score_of(r["question_id"], r["turn"]) and r["error"] is None

    request = judge.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert request["body"]["model"] == "judge-1" and request["body"]["temperature"] == 0
    assert request["body"]["max_tokens"] == 2048


@needs_data
def test_reference_answers_for_math_reasoning_coding(judge, tmp_path):
    refs = {json.loads(line)["question_id"]: json.loads(line)["choices"][0]["turns"]
            for line in (EVAL / "mt_bench" / "reference_answer_gpt-4.jsonl").read_text().splitlines()}
    summary = run(judge, write_answers(tmp_path / "answers.jsonl", "mt_bench"), "mt_bench")
    records = {(r["question_id"], r["turn"]): r for r in judgments(summary)}
    category = {q["question_id"]: q["category"] for q in questions("mt_bench")}
    for (qid, turn), r in records.items():
        graded_with_ref = category[qid] in ("math", "reasoning", "coding")
        assert r["judge"][1] == {(True, 1): "single-math-v1", (True, 2): "single-math-v1-multi-turn",
                                 (False, 1): "single-v1", (False, 2): "single-v1-multi-turn"}[graded_with_ref, turn]
        assert ("Reference" in r["user_prompt"]) == graded_with_ref
        if graded_with_ref:
            assert refs[qid][0] in r["user_prompt"]
            assert (refs[qid][1] in r["user_prompt"]) == (turn == 2)
    # FastChat's system prompts: a plain one for single-v1, the instructions for the multi-turn prompts
    systems = {asked(q["body"]): q["body"]["messages"][0]["content"] for q in judge.requests}
    assert systems[81, 1] == "You are a helpful assistant."
    assert systems[81, 2].startswith("Please act as an impartial judge") and "second user question" in systems[81, 2]


@needs_data
def test_mt_bench_ja_prompts(judge, tmp_path):
    summary = run(judge, write_answers(tmp_path / "answers.jsonl", "mt_bench_ja", ids=[1, 21, 31]), "mt_bench_ja")
    cats = {q["question_id"]: q["category"] for q in questions("mt_bench_ja")}
    ja_refs = {json.loads(line)["question_id"]: json.loads(line)["choices"][0]["turns"]
               for line in (EVAL / "mt_bench_ja" / "reference_answer_gpt-4.jsonl").read_text().splitlines()}
    assert summary["n_judged"] == 6
    systems = {asked(q["body"]): q["body"]["messages"][0]["content"] for q in judge.requests}
    for r in judgments(summary):
        qid, turn = r["question_id"], r["turn"]
        if turn == 1:
            assert systems[qid, 1] == "あなたは有益な助手です。" and r["user_prompt"].startswith("[指示]")
        else:  # no Japanese multi-turn prompt exists: FastChat's English one
            assert r["judge"][1].endswith("multi-turn") and r["user_prompt"].startswith("<|The Start of")
        if cats[qid] in ("math", "reasoning", "coding"):
            assert ja_refs[qid][0] in r["user_prompt"]
    assert {cats[1], cats[21], cats[31]} & {"coding", "math", "reasoning"}


@needs_data
def test_logickor_prompt_and_references(judge, tmp_path):
    judge.reply = lambda body, n: (200, completion("영어로 답했으므로 Rating: [[0]]"))
    summary = run(judge, write_answers(tmp_path / "answers.jsonl", "logickor", ids=[1, 3, 8]), "logickor")
    assert summary["n_judged"] == 6 and summary["overall"] == 0  # 0 is a rating (wrong language), not a failure
    records = {(r["question_id"], r["turn"]): r for r in judgments(summary)}
    assert "Reference" not in records[1, 1]["user_prompt"] and "Reference" not in records[1, 2]["user_prompt"]
    assert "다섯 벌" in records[3, 1]["user_prompt"]  # question 3's reference for turn 1 (it has none for turn 2)
    assert "유효하다." in records[8, 2]["user_prompt"] and records[8, 2]["judge"][1] == "logickor-multi-turn"
    system = judge.requests[0]["body"]["messages"][0]["content"]
    assert "Korean" in system and "[[rating]]" in system


@needs_data
def test_retries_after_500_and_429_then_success(judge, tmp_path):
    statuses = iter([(500, {"error": "boom"}), (429, {"error": "slow down"})])
    judge.reply = lambda body, n: next(statuses, (200, completion("Rating: [[9]]")))
    summary = run(judge, write_answers(tmp_path / "answers.jsonl", "mt_bench", ids=[81]), "mt_bench")
    assert len(judge.requests) == 2 + 2  # turn 1: 500, 429, 200; turn 2: 200
    assert summary["n_judged"] == 2 and summary["overall"] == 9 and summary["n_failed"] == 0


@needs_data
def test_malformed_replies_are_recorded_and_the_run_goes_on(judge, tmp_path):
    def reply(body, n):
        qid, _ = asked(body)
        if qid == 81:
            return 200, completion("I cannot decide.")  # no rating
        if qid == 82:
            return 200, b"<html>gateway</html>"  # not JSON, every time
        return 200, completion("[[4]]")
    judge.reply = reply
    answers = write_answers(tmp_path / "answers.jsonl", "mt_bench", ids=[81, 82, 83])
    summary = run(judge, answers, "mt_bench")
    records = {(r["question_id"], r["turn"]): r for r in judgments(summary)}
    assert records[81, 1]["score"] == -1 and records[81, 1]["error"] == "no [[rating]] in the judgment"
    assert records[81, 1]["judgment"] == "I cannot decide."
    assert records[82, 2]["score"] == -1 and "malformed reply" in records[82, 2]["error"]
    assert records[83, 1]["score"] == records[83, 2]["score"] == 4
    assert summary["n_judged"] == 2 and summary["n_failed"] == 4 and summary["overall"] == 4
    assert sum(asked(r["body"])[0] == 82 for r in judge.requests) == 2 * (FAST["retries"] + 1)


@needs_data
def test_judge_down_records_errors_and_keeps_answers(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answers = write_answers(tmp_path / "answers.jsonl", "mt_bench")
    before = answers.read_bytes()
    summary = judge_answers(answers, "mt_bench", EVAL, f"http://127.0.0.1:{port}/v1", "judge-1",
                            api_key_env="TEST_JUDGE_KEY", **FAST)
    assert answers.read_bytes() == before
    assert summary["n_judged"] == 0 and summary["n_failed"] == 160 and summary["overall"] is None
    errors = [r["error"] for r in judgments(summary)]
    assert all("unreachable" in e for e in errors[:3]) and all(e.startswith("skipped") for e in errors[3:])


@needs_data
def test_bad_key_is_not_retried(judge, tmp_path):
    judge.reply = lambda body, n: (401, {"error": {"message": "invalid api key"}})
    summary = run(judge, write_answers(tmp_path / "answers.jsonl", "mt_bench", ids=[81, 82]), "mt_bench")
    assert len(judge.requests) == 3  # one request per judgment, none after three failures in a row
    assert summary["n_failed"] == 4 and "HTTP 401" in summary["failures"][0]["error"]


@needs_data
def test_resume_judges_only_what_failed(judge, tmp_path):
    answers = write_answers(tmp_path / "answers.jsonl", "mt_bench", ids=[81, 82, 83])
    judge.reply = lambda body, n: (200, completion("[[6]]" if asked(body)[0] != 82 else "no idea"))
    first = run(judge, answers, "mt_bench")
    assert first["n_failed"] == 2 and len(judge.requests) == 6
    judge.reply = lambda body, n: (200, completion("[[8]]"))
    second = run(judge, answers, "mt_bench")
    assert [asked(r["body"]) for r in judge.requests[6:]] == [(82, 1), (82, 2)]
    assert second["n_failed"] == 0 and second["n_judged"] == 6
    assert second["overall"] == pytest.approx((4 * 6 + 2 * 8) / 6)
    with pytest.raises(ValueError, match="one judge per judgments file"):
        judge_answers(answers, "mt_bench", EVAL, judge.url, "judge-2", api_key_env="TEST_JUDGE_KEY",
                      out_path=Path(second["judgments"]), **FAST)


# ---- failing fast, and evaluate.py's exit status ----

def closed_port() -> int:
    with socket.socket() as s:  # bound, never listening, then closed: connections are refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_data
def test_refused_connection_is_not_retried(tmp_path, monkeypatch):
    """Nothing listens on the port: waiting will not start a server, so no backoff (it used to cost 189 s)."""
    import elo.evaluation.judge

    slept = []
    monkeypatch.setattr(elo.evaluation.judge.time, "sleep", slept.append)
    answers = write_answers(tmp_path / "answers.jsonl", "mt_bench", ids=[81, 82])
    summary = judge_answers(answers, "mt_bench", EVAL, f"http://127.0.0.1:{closed_port()}", "judge-1",
                            api_key_env="TEST_JUDGE_KEY")  # the default retries and backoff
    assert slept == [] and summary["n_judged"] == 0 and summary["n_failed"] == 4


def test_check_reachable(judge):
    from elo.evaluation.judge import check_reachable

    check_reachable(judge.url + "/v1")
    with pytest.raises(ValueError, match=r"judge at http://127.0.0.1:\d+/v1 is unreachable \(Connection refused\)"):
        check_reachable(f"http://127.0.0.1:{closed_port()}/v1")
    with pytest.raises(ValueError, match="expected an http"):
        check_reachable("localhost:8000")


def test_check_reachable_goes_through_the_proxy_urllib_uses(judge, monkeypatch):
    from elo.evaluation.judge import check_reachable

    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", judge.url)  # a judge host with no direct route, reached through a live proxy
    check_reachable("http://judge.invalid:9/v1")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(ValueError, match="unreachable"):
        check_reachable(judge.url)


@needs_data
@pytest.mark.filterwarnings("ignore:prompt of:UserWarning")
def test_evaluate_generation_without_judge_and_with_a_failing_one(judge, tiny_with_tokenizer, tmp_path, capsys):
    from elo.evaluation import evaluate
    from elo.tools.cli import run_main

    out = tmp_path / "results.json"
    argv = ["--model", str(tiny_with_tokenizer), "--generate", "logickor", "--max-new-tokens", "2", "--data-dir",
            str(EVAL), "--out", str(out)]
    run_main(evaluate.main, argv)  # no judge: say where the answers are and how to grade them
    answers = tmp_path / "results.logickor.answers.jsonl"
    assert f"logickor: answers in {answers}; not graded (no --judge-url)" in capsys.readouterr().out
    assert json.loads(out.read_text())["generation"] == {"logickor": None}

    judge.reply = lambda body, n: (401, {"error": {"message": "invalid api key"}})
    with pytest.raises(SystemExit) as e:  # every grading failed: the run must not look like a success
        run_main(evaluate.main, argv + ["--judge-url", judge.url, "--judge-model", "judge-1",
                                        "--judge-key-env", "TEST_JUDGE_KEY"])
    captured = capsys.readouterr()
    assert e.value.code == 2 and "error: the judge graded nothing for logickor" in captured.err
    assert "| logickor | judge score | - | 0 judged" in captured.out and out.is_file()
    assert len(judge.requests) == 3  # three failures in a row, then the rest is skipped


@needs_data
def test_a_judge_that_never_answers_is_given_up_at_the_deadline(tmp_path, capsys):
    """A server that accepts connections and never replies: the whole grading ends at its deadline (each request
    waits at most what is left of it), the rest recorded as skipped for a rerun, with progress on stderr."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)  # accepted by the kernel, never answered
        answers = write_answers(tmp_path / "answers.jsonl", "mt_bench", ids=[81, 82, 83])
        began = time.monotonic()
        summary = judge_answers(answers, "mt_bench", EVAL, f"http://127.0.0.1:{server.getsockname()[1]}/v1",
                                "judge-1", api_key_env="TEST_JUDGE_KEY", retries=0, timeout_s=300.0, deadline_s=1.5)
    assert time.monotonic() - began < 20
    errors = [r["error"] for r in judgments(summary)]
    assert summary["n_judged"] == 0 and len(errors) == 6
    assert any("deadline of 2s passed" in e for e in errors)  # 1.5 s, shown rounded
    assert "judge mt_bench: 6/6 judged" in capsys.readouterr().err
