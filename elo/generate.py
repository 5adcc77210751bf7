"""Decoding with the model's KV cache, and MT-Bench / LogicKor answer generation.

`generate` prefills the prompt into a KV cache sized for prompt + new tokens, then feeds one token at a time.
Greedy by default; temperature / top-p sampling with an optional seed. A prompt that does not fit the model's
context together with `max_new_tokens` is truncated from the left, with a warning, so that a long conversation
costs its oldest tokens rather than the run.

`generate_answers` answers a benchmark's two-turn questions with the model's chat template and appends one
FastChat-format answer record per question to a JSONL file (flushed line by line; a rerun skips the questions
already in it), ready for `elo.judge.judge_answers`.
"""
from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from elo.chat import render_chat, stop_token_ids
from elo.files import atomic_write_text
from elo.jsonl import read_jsonl

# Prompts are prefilled in chunks so that the logits of a long prompt never sit in memory all at once
# (they are (tokens x vocab) floats; only the last position's are needed).
PREFILL_CHUNK = 512

# bench -> question file, relative to the data dir (shared/data/eval). For mt_bench_ja we take question_full.jsonl:
# all 80 questions in MT-Bench's 8 categories, as in English (the repo's default question.jsonl has 60, without
# coding and math), so that per-category scores compare across languages.
QUESTION_FILES = {
    "mt_bench": "mt_bench/question.jsonl",
    "mt_bench_ja": "mt_bench_ja/question_full.jsonl",
    "logickor": "logickor/questions.jsonl",
}


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        # nucleus: the smallest set of most likely tokens whose mass reaches top_p (always at least one)
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p
        choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model: Any, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int], temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None) -> list[int]:
    """New token ids after `prompt_ids`, at most `max_new_tokens`; stops at (and leaves out) any id in `stop_ids`."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; expected at least one token (e.g. the chat template's BOS)")
    context = model.config.max_position_embeddings
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{context} tokens")
    if len(prompt_ids) + max_new_tokens > context:
        keep = context - max_new_tokens
        warnings.warn(f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new exceeds the model's context of "
                      f"{context}; keeping the last {keep} prompt tokens", stacklevel=2)
        prompt_ids = prompt_ids[-keep:]
    if max_new_tokens == 0:
        return []

    model.eval()
    device = model.model.embed_tokens.weight.device
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    for start in range(0, prompt.shape[1], PREFILL_CHUNK):
        logits = model(prompt[:, start:start + PREFILL_CHUNK], cache=cache)
    out: list[int] = []
    while True:
        token = _sample(logits[0, -1], temperature, top_p, generator)
        if token in stop_ids:
            break
        out.append(token)
        if len(out) == max_new_tokens:
            break
        logits = model(torch.tensor([[token]], dtype=torch.long, device=device), cache=cache)
    return out


# ---- benchmark questions ----

def load_questions(bench: str, data_dir: Path) -> list[dict]:
    """The bench's questions as {"question_id", "category", "turns": [t1, t2], "references": [r1 | None, r2 | None]}
    (references: LogicKor's own; MT-Bench's come from its reference-answer file, see elo.judge)."""
    if bench not in QUESTION_FILES:
        raise ValueError(f"unknown bench {bench!r}; expected one of {', '.join(QUESTION_FILES)}")
    path = Path(data_dir) / QUESTION_FILES[bench]
    if not path.is_file():
        raise FileNotFoundError(f"{bench} questions not found at {path}; expected data_dir to be shared/data/eval")
    questions = []
    for n, q in read_jsonl(path):
        logickor = bench == "logickor"
        keys = ("id", "category", "questions") if logickor else ("question_id", "category", "turns")
        if any(k not in q for k in keys) or len(q[keys[2]]) < 2:
            raise ValueError(f"{path}:{n}: record lacks one of the fields {keys} or has fewer than two turns")
        # two turns, as MT-Bench and LogicKor's own generator use (LogicKor question 3 repeats its second turn)
        questions.append({
            "question_id": q[keys[0]],
            "category": q["category"],
            "turns": q[keys[2]][:2],
            "references": (q.get("references") or [None, None])[:2],
        })
    return questions


# ---- answer files ----

def read_records(path: Path, repair: bool = True) -> list[dict]:
    """Records of an append-only JSONL file ([] if there is none). A last line cut short by a crash is skipped and,
    with `repair`, removed from the file (rewritten atomically) so that appending can resume; a bad line elsewhere
    is an error."""
    if not path.is_file():
        return []
    *lines, tail = path.read_text(encoding="utf-8").split("\n")  # tail: text after the last newline, "" if none
    records = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: malformed JSON line") from None
    if tail.strip():
        try:
            records.append(json.loads(tail))
            lines.append(tail)
        except json.JSONDecodeError:
            warnings.warn(f"{path}: skipping a truncated last line (an interrupted run)", stacklevel=2)
        if not repair:
            return records
        # rewrite newline-terminated (without a cut-short line) so that the next append starts a line of its own
        atomic_write_text(path, "".join(line + "\n" for line in lines))
    return records


def append_record(f: Any, record: dict) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _answer_text(tokenizer: Any, ids: list[int]) -> str:
    # like FastChat, the answer is the decoded text without special tokens, stripped
    special = set(tokenizer.special_tokens.values())
    return tokenizer.decode([i for i in ids if i not in special]).strip()


def generate_answers(model: Any, tokenizer: Any, bench: str, data_dir: Path, out_path: Path,
                     max_new_tokens: int = 1024, temperature: float = 0.0, model_id: str | None = None) -> Path:
    """Answer every question of `bench` (both turns, the second seeing the first answer) and append FastChat answer
    records {question_id, answer_id, model_id, choices: [{index, turns}], tstamp} to `out_path`. Questions already
    answered in `out_path` are skipped. FastChat samples some categories at temperature 0.7; we decode greedily by
    default so that runs are reproducible. `model_id` defaults to the model directory's name."""
    out_path = Path(out_path)
    questions = load_questions(bench, data_dir)
    if model_id is None:
        model_id = Path(model.name_or_path).name if getattr(model, "name_or_path", None) else "elo"
    done = set()
    for record in read_records(out_path):
        if record.get("model_id") != model_id:
            raise ValueError(f"{out_path} holds answers of model {record.get('model_id')!r}, not {model_id!r}; "
                             "expected one model per answer file")
        done.add(record["question_id"])
    stop = stop_token_ids(tokenizer) | _config_eos(model)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as f:
        for q in questions:
            if q["question_id"] in done:
                continue
            messages, answers = [], []
            for turn in q["turns"]:
                messages.append({"role": "user", "content": turn})
                ids = tokenizer.encode(render_chat(tokenizer, messages, add_generation_prompt=True))
                answer = _answer_text(tokenizer, generate(model, ids, max_new_tokens, stop, temperature))
                messages.append({"role": "assistant", "content": answer})
                answers.append(answer)
            append_record(f, {"question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
                              "choices": [{"index": 0, "turns": answers}], "tstamp": time.time()})
    return out_path


def _config_eos(model: Any) -> set[int]:
    eos = model.config.eos_token_id
    return set() if eos is None else set(eos) if isinstance(eos, list) else {eos}
