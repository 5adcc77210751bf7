"""Decoding with the model's KV cache, one prompt or many at once, and MT-Bench / LogicKor answer generation.

`stream` decodes a batch of prompts together and yields each token as it is chosen. The prompts may differ in
length: every cache row keeps its own length (see elo.model.KVCache), so a row's positions, mask and keys are those
it would have alone and greedy decoding gives the same tokens as one prompt at a time. Each row stops at its own
stop ids or `max_new_tokens`, and then leaves the batch, so finished rows cost nothing. Greedy by default;
temperature / top-p sampling draws each row from its own seeded generator, so a row's tokens do not depend on the
rest of the batch. A prompt that does not fit the model's context together with `max_new_tokens` is truncated from
the left, with a warning, so that a long conversation costs its oldest tokens rather than the run.

`generate_answers` answers a benchmark's two-turn questions with the model's chat template, `batch_size` questions
at a time (turn 2 of those once their turn 1 is done), and appends one FastChat-format answer record per question to
a JSONL file (fsynced line by line; a rerun skips the questions already in it), ready for `elo.evaluation.judge.judge_answers`.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from elo.data.chat_templates import render_chat, stop_token_ids
from elo.tools.files import atomic_write_text
from elo.tools.jsonl import read_jsonl

# Prompts are prefilled at most this many tokens (over the whole batch) per forward pass: enough for full-size
# matrix multiplies, and a bound on the activations held at once however long the prompts.
PREFILL_TOKENS = 4096

# bench -> question file, relative to the data dir (shared/data/eval). For mt_bench_ja we take question_full.jsonl:
# all 80 questions in MT-Bench's 8 categories, as in English (the repo's default question.jsonl has 60, without
# coding and math), so that per-category scores compare across languages.
QUESTION_FILES = {
    "mt_bench": "mt_bench/question.jsonl",
    "mt_bench_ja": "mt_bench_ja/question_full.jsonl",
    "logickor": "logickor/questions.jsonl",
}


def _per_row(value: Any, n: int, name: str) -> list:
    """One value for every row: a list given per row, or a single value repeated."""
    if isinstance(value, Sequence):  # (a set of stop ids is not one: it is shared by all rows)
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts; expected one per prompt")
        return list(value)
    return [value] * n


def _fit(prompt: list[int], max_new_tokens: int, context: int) -> list[int]:
    """The prompt, checked and, if it does not fit the context with max_new_tokens, truncated from the left."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompt:
        raise ValueError("prompt_ids is empty; expected at least one token (e.g. the chat template's BOS)")
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{context} tokens")
    if len(prompt) + max_new_tokens > context:
        keep = context - max_new_tokens
        warnings.warn(f"prompt of {len(prompt)} tokens + {max_new_tokens} new exceeds the model's context of "
                      f"{context}; keeping the last {keep} prompt tokens", stacklevel=4)
        prompt = prompt[-keep:]
    return prompt


def stream(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
           stop_ids: set[int] | Sequence[set[int]], temperature: float = 0.0, top_p: float = 1.0,
           seeds: Sequence[int | None] | None = None) -> Iterator[tuple[int, int]]:
    """Decode all `prompts` together; yield (prompt index, token id) for each new token as soon as it is chosen.
    Prompt i gets at most max_new_tokens[i] tokens (an int: the same for all) and stops at (leaving it out) any id
    in its stop set. Sampling with temperature > 0 draws prompt i's tokens from a generator seeded with seeds[i]
    (None: torch's global generator). Arguments are checked here, before any decoding."""
    n = len(prompts)
    limits = _per_row(max_new_tokens, n, "max_new_tokens")
    stops = _per_row(stop_ids, n, "stop_ids")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    context = model.config.max_position_embeddings
    fitted = [_fit(list(p), m, context) for p, m in zip(prompts, limits)]
    generators = [None if s is None else torch.Generator().manual_seed(s) for s in _per_row(seeds, n, "seeds")]
    return _decode(model, fitted, limits, stops, temperature, top_p, generators)


@torch.inference_mode()
def _decode(model: Any, prompts: list[list[int]], limits: list[int], stops: list[set[int]], temperature: float,
            top_p: float, generators: list[torch.Generator | None]) -> Iterator[tuple[int, int]]:
    rows = [i for i, m in enumerate(limits) if m > 0]  # rows[r]: the prompt that cache row r decodes
    if not rows:
        return
    model.eval()
    device = model.device
    cache = model.new_cache(len(rows), max(len(prompts[i]) + limits[i] for i in rows))
    # Prompts of different lengths are prefilled right-padded, but for their last token: a padding slot sits after
    # its row's prompt, so the causal mask keeps it out of the prompt's own keys, and the first decode step, which
    # feeds each prompt's last token at its row's own position, overwrites it. Prompts of one length (a single one,
    # say) are prefilled whole, and the prefill's last logits choose the first token.
    whole = len({len(prompts[i]) for i in rows}) == 1
    heads = [prompts[i] if whole else prompts[i][:-1] for i in rows]
    width = max(map(len, heads))
    padded = torch.zeros(len(rows), width, dtype=torch.long)
    for r, head in enumerate(heads):
        padded[r, :len(head)] = torch.tensor(head, dtype=torch.long)
    padded = padded.to(device)
    chunk = max(1, PREFILL_TOKENS // len(rows))
    for start in range(0, width, chunk):
        logits = model(padded[:, start:start + chunk], cache=cache, last_logits=1 if whole else 0)
    cache.lengths = [len(head) for head in heads]

    def step(ids: list[int]) -> torch.Tensor:
        return model(torch.tensor(ids, dtype=torch.long, device=device)[:, None], cache=cache)

    if not whole:
        logits = step([prompts[i][-1] for i in rows])
    made = dict.fromkeys(rows, 0)
    while True:
        tokens = _choose(logits[:, -1], temperature, top_p, [generators[i] for i in rows])
        keep = []
        for r, (i, token) in enumerate(zip(rows, tokens)):
            if token in stops[i]:
                continue
            yield i, token
            made[i] += 1
            if made[i] < limits[i]:
                keep.append(r)
        if not keep:
            return
        if len(keep) < len(rows):
            # compacting copies the cache once, about what one step's attention reads anyway
            cache.keep(keep)
        rows = [rows[r] for r in keep]
        logits = step([tokens[r] for r in keep])


def _choose(logits: torch.Tensor, temperature: float, top_p: float,
            generators: list[torch.Generator | None]) -> list[int]:
    """Next token of every row: the argmax, or a draw at `temperature` from the top-p nucleus."""
    if temperature == 0.0:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        # nucleus: the smallest set of most likely tokens whose mass reaches top_p (always at least one)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs *= sorted_probs.cumsum(-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # each row draws on the CPU from its own generator: its tokens depend on its seed alone, not on its batch
    # neighbours (nor on the device)
    probs = probs.cpu()
    return [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, generators)]


def generate_batch(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                   stop_ids: set[int] | Sequence[set[int]], temperature: float = 0.0, top_p: float = 1.0,
                   seeds: Sequence[int | None] | None = None) -> list[list[int]]:
    """New token ids after each prompt, decoded together (see `stream`)."""
    out: list[list[int]] = [[] for _ in prompts]
    for i, token in stream(model, prompts, max_new_tokens, stop_ids, temperature, top_p, seeds):
        out[i].append(token)
    return out


def generate(model: Any, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int], temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None) -> list[int]:
    """New token ids after `prompt_ids`, at most `max_new_tokens`; stops at (and leaves out) any id in `stop_ids`."""
    return generate_batch(model, [prompt_ids], max_new_tokens, stop_ids, temperature, top_p, [seed])[0]


def chat_stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """Ids that end an assistant turn: the chat template's end-of-turn tokens, the tokenizer's and the config's EOS."""
    eos = model.config.eos_token_id
    return stop_token_ids(tokenizer) | (set() if eos is None else set(eos) if isinstance(eos, list) else {eos})


# ---- benchmark questions ----

def load_questions(bench: str, data_dir: Path) -> list[dict]:
    """The bench's questions as {"question_id", "category", "turns": [t1, t2], "references": [r1 | None, r2 | None]}
    (references: LogicKor's own; MT-Bench's come from its reference-answer file, see elo.evaluation.judge)."""
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


def answer_text(tokenizer: Any, ids: list[int]) -> str:
    # like FastChat, the answer is the decoded text without special tokens, stripped
    special = set(tokenizer.special_tokens.values())
    return tokenizer.decode([i for i in ids if i not in special]).strip()


def generate_answers(model: Any, tokenizer: Any, bench: str, data_dir: Path, out_path: Path,
                     max_new_tokens: int = 1024, temperature: float = 0.0, model_id: str | None = None,
                     batch_size: int = 1, limit: int | None = None) -> Path:
    """Answer every question of `bench` (both turns, the second seeing the first answer) and append FastChat answer
    records {question_id, answer_id, model_id, choices: [{index, turns}], tstamp} to `out_path`. Questions already
    answered in `out_path` are skipped. FastChat samples some categories at temperature 0.7; we decode greedily by
    default so that runs are reproducible. `model_id` defaults to the model directory's name. `batch_size` questions
    are decoded together (greedy answers are the same whatever it is); their records are appended once both turns of
    all of them are done. `limit`: only the first that many questions. Progress (questions done, elapsed, ETA) goes
    to stderr after each batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out_path = Path(out_path)
    questions = load_questions(bench, data_dir)[:limit]
    if model_id is None:
        model_id = Path(model.name_or_path).name if getattr(model, "name_or_path", None) else "elo"
    done = set()
    for record in read_records(out_path):
        if record.get("model_id") != model_id:
            raise ValueError(f"{out_path} holds answers of model {record.get('model_id')!r}, not {model_id!r}; "
                             "expected one model per answer file")
        done.add(record["question_id"])
    stop = chat_stop_ids(model, tokenizer)
    todo = [q for q in questions if q["question_id"] not in done]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with open(out_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            group = todo[start:start + batch_size]
            chats: list[list[dict]] = [[] for _ in group]
            for turn in range(2):  # load_questions keeps two turns; the second sees the first answer
                for q, messages in zip(group, chats):
                    messages.append({"role": "user", "content": q["turns"][turn]})
                prompts = [tokenizer.encode(render_chat(tokenizer, messages)) for messages in chats]
                for messages, ids in zip(chats, generate_batch(model, prompts, max_new_tokens, stop, temperature)):
                    messages.append({"role": "assistant", "content": answer_text(tokenizer, ids)})
            for q, messages in zip(group, chats):
                answers = [m["content"] for m in messages if m["role"] == "assistant"]
                append_record(f, {"question_id": q["question_id"], "answer_id": uuid.uuid4().hex,
                                  "model_id": model_id, "choices": [{"index": 0, "turns": answers}],
                                  "tstamp": time.time()})
            done_now, elapsed = start + len(group), time.monotonic() - began
            print(f"{bench}: {len(done) + done_now}/{len(questions)} questions answered, {elapsed:.0f}s, ETA "
                  f"{elapsed / done_now * (len(todo) - done_now):.0f}s", file=sys.stderr, flush=True)
    return out_path
