"""LLM-as-a-judge grading of generated answers through an OpenAI-compatible /v1/chat/completions endpoint.

MT-Bench single-answer grading as FastChat's gen_judgment.py does it: turn 1 with "single-v1" (or
"single-math-v1" plus the GPT-4 reference answer for math, reasoning and coding), turn 2 with the
"-multi-turn" variants, temperature 0, max_tokens 2048; the rating is the first `[[x]]` in the judgment, else the
first `[x]`, else -1. mt_bench_ja uses the Japanese prompts (judge_ja_prompts.jsonl) and its own references for
turn 1; that file has no multi-turn prompts, so turn 2 uses the English multi-turn ones (the conversation is in
Japanese either way). LogicKor is graded with prompts of our own following its published rubric: requirements
met, omissions, length not rewarded, the reference answer consulted when there is one, the follow-up consistent
with the conversation, and an answer not in Korean rated 0.

Judgments are appended to a JSONL file one line at a time (flushed): one record per (question, turn) with the
prompt, the judge's text, the score and an error (None when a rating was parsed). A judge that is down or answers
garbage never stops the run: the failure is recorded and the run moves on; after a few failures in a row the judge
is considered unreachable and the remaining turns are recorded as skipped. A rerun judges again only the turns whose
last record has an error. The summary, like FastChat's show_result, averages the scores that are not -1.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from elo.evaluation.generate import append_record, load_questions, read_records
from elo.tools.jsonl import read_jsonl

NEED_REF_CATEGORIES = ("math", "reasoning", "coding")  # FastChat's NEED_REF_CATS
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")  # FastChat's one_score_pattern
RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")  # and its one_score_pattern_backup
MAX_CONSECUTIVE_FAILURES = 3  # then the judge counts as unreachable for the rest of the run

_LOGICKOR_RULES = """You are a meticulous judge of a Korean-language AI assistant. {task} Follow these rules:
1. Check in detail whether the answer fulfils everything the question asks for.
2. Point out what is wrong, what is missing and what should have been included.
3. Do not let the length of the answer influence the rating.
4. If a reference answer is given, use it to judge correctness.{extra}
Language: the assistant must answer in Korean, unless the question itself asks for an answer in English or another \
language. An answer in the wrong language is rated 0. Answering in Korean is required, but it earns no credit of \
its own.
Write your evaluation in 4 to 5 sentences, then rate the answer from 1 to 10 (0 only for the wrong language), \
strictly in this format: "[[rating]]", for example: "Rating: [[5]]"."""

LOGICKOR_PROMPTS = {
    "logickor-single": {
        "name": "logickor-single",
        "system_prompt": _LOGICKOR_RULES.format(task="Evaluate the assistant's answer to the question below.",
                                                extra=""),
        "prompt_template": "[Question]\n{question}\n\n{reference}[The Start of Assistant's Answer]\n{answer}\n"
                           "[The End of Assistant's Answer]",
    },
    "logickor-multi-turn": {
        "name": "logickor-multi-turn",
        "system_prompt": _LOGICKOR_RULES.format(
            task="Evaluate the assistant's answer to the follow-up (second) question of the conversation below.",
            extra="\n5. Check that the answer to the follow-up question is consistent with the earlier conversation."),
        "prompt_template": "<|The Start of the Conversation|>\n\n### User:\n{question_1}\n\n### Assistant:\n"
                           "{answer_1}\n\n### User:\n{question_2}\n\n### Assistant:\n{answer_2}\n\n"
                           "<|The End of the Conversation|>\n\n{reference}",
    },
}


class JudgeError(Exception):
    """The judge gave no usable reply (after retries where retrying can help)."""


# ---- prompts and references ----

def _prompts_by_name(path: Path) -> dict[str, dict]:
    if not path.is_file():
        raise FileNotFoundError(f"judge prompts not found at {path}; expected data_dir to be shared/data/eval")
    return {p["name"]: p for _, p in read_jsonl(path)}


def judge_prompts(bench: str, data_dir: Path) -> dict[str, dict]:
    """Prompt records {name, system_prompt, prompt_template} for turn 1 and turn 2, with and without a reference:
    keys "single", "single-ref", "multi", "multi-ref"."""
    if bench == "logickor":
        single, multi = LOGICKOR_PROMPTS["logickor-single"], LOGICKOR_PROMPTS["logickor-multi-turn"]
        return {"single": single, "single-ref": single, "multi": multi, "multi-ref": multi}
    en = _prompts_by_name(Path(data_dir) / "mt_bench" / "judge_prompts.jsonl")
    ja = bench == "mt_bench_ja"
    first = _prompts_by_name(Path(data_dir) / "mt_bench_ja" / "judge_ja_prompts.jsonl") if ja else en
    return {"single": first["single-v1"], "single-ref": first["single-math-v1"],
            "multi": en["single-v1-multi-turn"], "multi-ref": en["single-math-v1-multi-turn"]}


def references(bench: str, data_dir: Path, questions: list[dict]) -> dict[object, list[str | None]]:
    """Reference answers per question id, for the questions that are graded against one: MT-Bench's GPT-4
    answers for math, reasoning and coding; LogicKor's own references wherever it has them."""
    if bench == "logickor":
        return {q["question_id"]: q["references"] for q in questions if any(q["references"])}
    path = Path(data_dir) / bench / "reference_answer_gpt-4.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"reference answers not found at {path}; expected data_dir to be shared/data/eval")
    answers = {r["question_id"]: r["choices"][0]["turns"] for _, r in read_jsonl(path)}
    need = [q["question_id"] for q in questions if q["category"] in NEED_REF_CATEGORIES]
    missing = [qid for qid in need if qid not in answers]
    if missing:
        raise ValueError(f"{path} lacks reference answers for questions {missing}")
    return {qid: answers[qid] for qid in need}


def _reference_block(bench: str, refs: list[str | None], turn: int) -> str:
    # only LogicKor templates take a {reference} block; MT-Bench's name ref_answer_1/2 in the text instead
    if bench != "logickor":
        return ""
    if turn == 1:
        return f"[The Start of Reference Answer]\n{refs[0]}\n[The End of Reference Answer]\n\n" if refs[0] else ""
    labels = ("Reference answer to the first question", "Reference answer to the follow-up question")
    return "".join(f"[{label}]\n{ref}\n\n" for label, ref in zip(labels, refs) if ref)


def build_prompt(bench: str, prompts: dict[str, dict], question: dict, answer_turns: list[str], turn: int,
                 refs: list[str | None] | None) -> tuple[str, str, str]:
    """(prompt name, system message, user message) for judging turn 1 or 2 of one answer."""
    key = ("single" if turn == 1 else "multi") + ("-ref" if refs else "")
    prompt = prompts[key]
    values = {"reference": _reference_block(bench, refs or [None, None], turn)}
    if refs:
        values["ref_answer_1"] = refs[0]
        if turn == 2:
            values["ref_answer_2"] = refs[1]
    q, a = question["turns"], answer_turns
    if turn == 1:
        values.update(question=q[0], answer=a[0])
    else:
        values.update(question_1=q[0], question_2=q[1], answer_1=a[0], answer_2=a[1])
    return prompt["name"], prompt["system_prompt"], prompt["prompt_template"].format(**values)


def parse_rating(judgment: str) -> float:
    """The judge's rating: the first [[x]], else the first [x]; -1 when there is none."""
    match = RATING.search(judgment) or RATING_BACKUP.search(judgment)
    return float(match.group(1)) if match else -1.0


# ---- the endpoint ----

def endpoint(judge_url: str) -> str:
    """Full chat-completions URL from a server root, a .../v1 base URL or the full URL itself."""
    url = judge_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def chat_completion(url: str, model: str, system: str, user: str, api_key: str | None, retries: int = 5,
                    backoff_s: float = 2.0, timeout_s: float = 300.0) -> str:
    """The judge's reply text. Timeouts, dropped connections, HTTP 429 / 5xx and malformed replies are retried with
    exponential backoff (backoff_s, 2 backoff_s, ...); other HTTP errors (bad key, bad request) and a refused
    connection (nothing listens on that port: waiting will not start a server) are not."""
    body = json.dumps({"model": model, "temperature": 0, "max_tokens": 2048,
                       "messages": [{"role": "system", "content": system},
                                    {"role": "user", "content": user}]}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    error = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=timeout_s) as reply:
                content = json.loads(reply.read())["choices"][0]["message"]["content"]
            if isinstance(content, str):
                return content
            error = f"malformed reply: message content is {type(content).__name__}"
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code} from {url}: {e.read()[:200].decode(errors='replace')}"
            if e.code != 429 and e.code < 500:
                raise JudgeError(error) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, unreachable, timed out, cut
            reason = getattr(e, "reason", e)
            error = f"{url} unreachable: {reason}"
            if isinstance(reason, ConnectionRefusedError):
                raise JudgeError(error) from None
        except (ValueError, KeyError, IndexError, TypeError) as e:  # not JSON, or not a chat completion
            error = f"malformed reply: {type(e).__name__}: {e}"
    raise JudgeError(f"{error} (gave up after {retries + 1} attempts)")


def check_reachable(judge_url: str, timeout_s: float = 10.0) -> None:
    """Fail in one line, before any answer is generated, when nothing accepts connections at the judge's address."""
    parts = urllib.parse.urlsplit(endpoint(judge_url))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--judge-url {judge_url!r}: expected an http(s) URL such as http://localhost:8000/v1")
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):  # urllib will connect to the proxy, not the judge
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(f"judge at {judge_url} is unreachable ({e.strerror or e}); start it or fix --judge-url") from None


# ---- grading ----

def default_judgments_path(answers_path: Path, judge_model: str) -> Path:
    safe = re.sub(r"[^\w.-]+", "_", judge_model)
    return answers_path.with_name(f"{answers_path.stem}.judge-{safe}.jsonl")


def judge_answers(answers_path: Path, bench: str, data_dir: Path, judge_url: str, judge_model: str,
                  api_key_env: str = "OPENAI_API_KEY", out_path: Path | None = None, retries: int = 5,
                  backoff_s: float = 2.0, timeout_s: float = 300.0, deadline_s: float = 1800.0) -> dict:
    """Grade both turns of every answer in `answers_path` (generate_answers' output) and append the judgments to
    `out_path` (default: beside the answers, named after the judge). Returns `summarize`'s dict. The whole grading
    gets `deadline_s` seconds (no request waits past it; what is left is recorded as skipped, so a rerun grades it),
    and reports its progress on stderr."""
    answers_path = Path(answers_path)
    if not answers_path.is_file():
        raise FileNotFoundError(f"no answers file at {answers_path}; expected generate_answers' output")
    out_path = Path(out_path) if out_path else default_judgments_path(answers_path, judge_model)
    questions = load_questions(bench, data_dir)
    by_id = {q["question_id"]: q for q in questions}
    prompts, refs = judge_prompts(bench, data_dir), references(bench, data_dir, questions)
    api_key = os.environ.get(api_key_env)
    if not api_key:
        warnings.warn(f"${api_key_env} is not set; calling the judge without an API key", stacklevel=2)
    url = endpoint(judge_url)

    done = set()
    for r in read_records(out_path):
        if r["judge"][0] != judge_model:
            raise ValueError(f"{out_path} holds judgments by {r['judge'][0]!r}, not {judge_model!r}; "
                             "expected one judge per judgments file")
        if r["error"] is None:
            done.add((r["question_id"], r["turn"]))
        else:
            done.discard((r["question_id"], r["turn"]))

    failures_in_a_row = 0
    answers = read_records(answers_path, repair=False)
    todo = sum((a["question_id"], t) not in done for a in answers for t in (1, 2))
    start, graded = time.monotonic(), 0
    with open(out_path, "a", encoding="utf-8") as f:
        for answer in answers:
            qid = answer["question_id"]
            if qid not in by_id:
                raise ValueError(f"{answers_path}: question {qid!r} is not a {bench} question")
            question, turns = by_id[qid], answer["choices"][0]["turns"]
            for turn in (1, 2):
                if (qid, turn) in done:
                    continue
                name, system, user = build_prompt(bench, prompts, question, turns, turn, refs.get(qid))
                judgment, score, error = "", -1.0, None
                left = deadline_s - (time.monotonic() - start)
                if failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
                    error = f"skipped: the judge failed {failures_in_a_row} times in a row"
                elif left <= 0:
                    error = f"skipped: the judge's deadline of {deadline_s:.0f}s passed"
                else:
                    try:
                        judgment = chat_completion(url, judge_model, system, user, api_key, retries, backoff_s,
                                                   min(timeout_s, left))
                        failures_in_a_row = 0
                        score = parse_rating(judgment)
                        error = None if score >= 0 else "no [[rating]] in the judgment"
                    except JudgeError as e:
                        failures_in_a_row += 1
                        error = str(e)
                append_record(f, {"question_id": qid, "model_id": answer.get("model_id"),
                                  "category": question["category"], "turn": turn, "judge": [judge_model, name],
                                  "user_prompt": user, "judgment": judgment, "score": score, "error": error,
                                  "tstamp": time.time()})
                graded += 1
                elapsed = time.monotonic() - start
                print(f"judge {bench}: {graded}/{todo} judged, {elapsed:.0f}s, ETA {elapsed / graded * (todo - graded):.0f}s"
                      + (f"; last: {error}" if error else ""), file=sys.stderr, flush=True)
    return summarize(out_path, bench, data_dir)


def _mean(scores: list[float]) -> float | None:
    return sum(scores) / len(scores) if scores else None


def summarize(judgments_path: Path, bench: str, data_dir: Path) -> dict:
    """Mean scores overall, per turn and per category (categories in question order), over each (question, turn)'s
    latest judgment, leaving out failed ones (score -1), which are counted and listed instead."""
    latest = {(r["question_id"], r["turn"]): r for r in read_records(Path(judgments_path), repair=False)}
    valid = [r for r in latest.values() if r["score"] >= 0]
    order = list(dict.fromkeys(q["category"] for q in load_questions(bench, data_dir)))
    return {
        "bench": bench,
        "judgments": str(judgments_path),
        "judge_model": next((r["judge"][0] for r in latest.values()), None),
        "overall": _mean([r["score"] for r in valid]),
        "turn_1": _mean([r["score"] for r in valid if r["turn"] == 1]),
        "turn_2": _mean([r["score"] for r in valid if r["turn"] == 2]),
        "categories": {c: _mean([r["score"] for r in valid if r["category"] == c]) for c in order},
        "n_judged": len(valid),
        "n_failed": len(latest) - len(valid),
        "failures": [{"question_id": r["question_id"], "turn": r["turn"], "error": r["error"]}
                     for r in latest.values() if r["score"] < 0],
    }
