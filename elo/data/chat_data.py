"""SFT data: chat conversations rendered with the model's chat template, trained on the assistant's tokens only, and
drawn as a deterministic, resumable, rank-sharded mix of languages in exact conversation proportions.

The training loop uses it exactly as it uses elo.data.text's pretraining sampler:

    source, info = build_chat_source({"ko": [...], "en": [...]}, tokenizer, seq_len, mix, seed, rank, world_size)
    batch = source.next_batch(micro_batch_size)  # Batch(inputs [B, T], targets [B, T] (-1: not trained), langs)

plus `source.val_batches(lang, B)`, `state_dict()` / `load_state_dict()`. Targets are -1 on the system prompt, user
turns and assistant headers, so the usual loss (targets < 0 ignored) is the assistant-only loss.

Batching packs each micro-batch's conversations into one row with no padding (`pack`): `Batch.documents` holds their
lengths, and the model computes each conversation as if alone (its own positions from 0, attention within itself).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from elo.data.chat_templates import Message, tokenize_chats
from elo.data.sources import Shard, parse_source
from elo.data.text import Batch, LanguageMix, epoch_order, resolve_mix

# file form -> (turns key, role key, content key, role names -> chat roles)
FORMS = {
    "conversations": ("from", "value", {"system": "system", "human": "user", "gpt": "assistant"}),  # ShareGPT
    "messages": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),  # OpenAI
}
LENGTH_GROUP = 256  # conversations sorted by length together (per language, in drawing order)
_MAX_VAL_CONVERSATIONS = 128


# ---- reading ----

def read_chats(shard: Shard | str | os.PathLike) -> list[tuple[int, list[Message]]]:
    """(line or row number, messages) for each conversation of one chat file (a local path, or a shard of a SOURCE,
    elo.data.sources): JSON lines or Parquet rows in ShareGPT form (`conversations: [{from, value}]`) or OpenAI form
    (`messages: [{role, content}]`), detected from the first record. A bad record is a one-line error naming file
    and line (row). Turns after the last assistant turn are dropped (nothing to train)."""
    shard = shard if isinstance(shard, Shard) else Shard(os.fspath(shard))
    if shard.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{shard}: chat data is .jsonl or .parquet records; got a {shard.suffix or 'suffixless'} file")
    out, form = [], None
    for line, record in shard.records():
        where = f"{shard}:{line}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if form is None:
            form = next((k for k in FORMS if k in record), None)
            if form is None:
                raise ValueError(f"{where}: no 'conversations' (ShareGPT) or 'messages' (OpenAI) list")
        out.append((line, _messages(record, form, where)))
    return out


def _messages(record: dict, form: str, where: str) -> list[Message]:
    role_key, content_key, roles = FORMS[form]
    turns = record.get(form)
    if not isinstance(turns, list):
        raise ValueError(f"{where}: no {form!r} list (the file's first record has one)")
    if not turns:
        raise ValueError(f"{where}: empty conversation")
    messages = []
    for j, turn in enumerate(turns):
        role = turn.get(role_key) if isinstance(turn, dict) else None
        if role not in roles:
            raise ValueError(f"{where}: unknown role {role!r} in turn {j}; expected {role_key} in {list(roles)}")
        if not isinstance(turn.get(content_key), str):
            raise ValueError(f"{where}: turn {j} has no string {content_key!r}")
        messages.append({"role": roles[role], "content": turn[content_key]})
    chat_roles = [m["role"] for m in messages]
    body = chat_roles[1:] if chat_roles[0] == "system" else chat_roles
    if any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(body)):
        raise ValueError(f"{where}: roles do not alternate: {[t.get(role_key) for t in turns]}; expected an "
                         f"optional system turn, then user and assistant turns in turn")
    if "assistant" not in body:
        raise ValueError(f"{where}: no assistant turn; nothing to train on")
    last = len(chat_roles) - chat_roles[::-1].index("assistant")
    return messages[:last]


def read_chat_source(source: str | os.PathLike) -> list[tuple[str, list[Message]]]:
    """("file:line", messages) for each conversation of a SOURCE (elo.data.sources), shard by shard; a source with
    none is an error."""
    listing = parse_source(source).list_shards()
    if listing.source.tokens is not None:
        raise ValueError(f"{listing.source}: ?tokens= limits pretraining text; chat data is read whole")
    chats = [(f"{shard}:{line}", messages) for shard in listing.shards for line, messages in read_chats(shard)]
    if not chats:
        raise ValueError(f"{listing.source}: no conversations" + (" pass its filters" if listing.source.where else ""))
    return chats


# ---- one language: tokenized conversations ----

@dataclass
class ChatSet:
    """Tokenized conversations, concatenated: conversation i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray  # int64 token ids
    trained: np.ndarray  # bool, one per token
    offsets: np.ndarray  # int64 [n + 1]

    @classmethod
    def of(cls, examples: list[tuple[list[int], list[bool]]]) -> "ChatSet":
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(ids) for ids, _ in examples])
        ids = np.fromiter((i for e, _ in examples for i in e), dtype=np.int64, count=int(offsets[-1]))
        trained = np.fromiter((f for _, e in examples for f in e), dtype=bool, count=int(offsets[-1]))
        return cls(ids, trained, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.offsets[i], self.offsets[i + 1]
        return self.ids[s:e], self.trained[s:e]


@dataclass(frozen=True)
class ChatInfo:
    lang: str
    files: tuple[str, ...]
    conversations: int  # records read
    whole: int  # kept with every turn
    truncated: int  # kept with their later turns dropped to fit seq_len
    skipped: int  # first assistant answer does not fit seq_len
    unaligned: int  # skipped: a token straddles a turn boundary, so no exact mask exists
    train: int
    val: int
    tokens: int  # tokens of the kept conversations
    trained_tokens: int
    seconds: float


def tokenize_language(tokenizer: Any, chats: list[tuple[str, list[Message]]],
                      seq_len: int) -> tuple[list[tuple[list[int], list[bool]]], dict[str, int]]:
    """Tokenize (where, messages) conversations with masks; a conversation longer than seq_len + 1 tokens keeps its
    leading whole turns up to the last assistant answer that fits, and is skipped if even the first does not."""
    try:
        results = tokenize_chats(tokenizer, [m for _, m in chats])
    except ValueError:  # a template refusing a conversation (e.g. a system turn for Mistral v0.1): name it
        for where, messages in chats:
            try:
                tokenize_chats(tokenizer, [messages])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        raise
    kept, counts = [], dict(whole=0, truncated=0, skipped=0, unaligned=0)
    for (_, messages), result in zip(chats, results):
        answers = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
        status = "whole"
        while result is not None and len(result[0]) > seq_len + 1:
            answers.pop()
            if not answers:
                status = "skipped"
                break
            status = "truncated"
            result = tokenize_chats(tokenizer, [messages[:answers[-1]]])[0]
        if result is None:
            status = "unaligned"
        counts[status] += 1
        if status in ("whole", "truncated"):
            kept.append(result)
    return kept, counts


# ---- batches ----

def pack(examples: list[tuple[np.ndarray, np.ndarray]], langs: list[str]) -> Batch:
    """Conversations one after another in a single row, without padding: of each, inputs ids[:-1] and targets ids[1:]
    where trained, else -1. `documents` holds their lengths, so the model computes each as if alone (its own
    positions, attention within itself): the same losses as one padded row per conversation."""
    inputs = np.concatenate([np.asarray(ids[:-1], dtype=np.int64) for ids, _ in examples])
    targets = np.concatenate([np.where(np.asarray(trained[1:], dtype=bool), ids[1:], -1).astype(np.int64)
                              for ids, trained in examples])
    return Batch(torch.from_numpy(inputs)[None], torch.from_numpy(targets)[None], langs,
                 documents=[len(ids) - 1 for ids, _ in examples])


class ChatSource(LanguageMix):
    """An endless global stream of training conversations shared by all ranks, defined by (data, mix, seed) alone.

    Language schedule: elo.data.text's earliest-deadline rule over conversations, so after every prefix of n
    conversations each language has within one conversation of n * share. Within a language: epoch e visits every
    training conversation once, in a permutation seeded by (seed, lang, e), taken in groups of LENGTH_GROUP that are
    each sorted by length, so that consecutive draws have similar lengths (micro-batches are packed, so this no
    longer saves padding; it keeps the packed rows of one step alike in size).
    Ranks: one micro-batch of B per rank consumes the next B * w conversations of the stream; they are sorted by
    length and rank r takes every w-th from position r, so w ranks at B see together exactly what a single process
    sees at B * w, with balanced lengths.
    """

    _size_key = "train_conversations"

    def __init__(self, train: dict[str, ChatSet], val: dict[str, ChatSet], mix: dict[str, float], seed: int,
                 rank: int = 0, world_size: int = 1):
        super().__init__(train, mix, seed, rank, world_size)
        self.train, self.val = train, val
        self._groups: dict[str, tuple[tuple[int, int], np.ndarray]] = {}  # lang -> ((epoch, group start), order)

    def _sizes(self) -> dict[str, int]:
        return {l: len(self.train[l]) for l in self.langs}

    def next_batch(self, batch_size: int) -> Batch:
        """This rank's next micro-batch of `batch_size` conversations (advances the stream by batch_size * world)."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected a positive integer")
        drawn = [self._draw() for _ in range(batch_size * self.world_size)]
        lengths = [len(self.train[l][i][0]) for l, i in drawn]
        by_length = sorted(range(len(drawn)), key=lambda j: (-lengths[j], j))
        mine = [drawn[j] for j in by_length[self.rank::self.world_size]]
        return pack([self.train[l][i] for l, i in mine], [l for l, _ in mine])

    def val_batches(self, lang: str, batch_size: int) -> Iterator[Batch]:
        """All held-out conversations of `lang` in a fixed order (the same on every rank); the last batch may be
        smaller."""
        if lang not in self.val:
            raise ValueError(f"no validation data for language {lang!r}; languages are {self.langs}")
        conversations = self.val[lang]
        for s in range(0, len(conversations), batch_size):
            idx = range(s, min(s + batch_size, len(conversations)))
            yield pack([conversations[i] for i in idx], [lang] * len(idx))

    def _draw(self) -> tuple[str, int]:
        lang, epoch, i = self._next()
        conversations = self.train[lang]
        start = i - i % LENGTH_GROUP
        key = (epoch, start)
        cached = self._groups.get(lang)
        if cached is None or cached[0] != key:
            group = epoch_order(self.seed, lang, epoch, len(conversations))[start:start + LENGTH_GROUP]
            cached = (key, group[np.argsort(conversations.lengths[group], kind="stable")])
            self._groups[lang] = cached
        return lang, int(cached[1][i - start])


# ---- entry point ----

def default_val_conversations(n: int) -> int:
    """1% of a language's conversations, at least 1 and at most 128."""
    return min(_MAX_VAL_CONVERSATIONS, max(1, n // 100))


def build_chat_source(sources_by_lang: dict[str, list[str | os.PathLike]], tokenizer: Any, seq_len: int,
                      mix: dict[str, float] | None, seed: int, rank: int = 0, world_size: int = 1,
                      val_conversations: int | None = None) -> tuple[ChatSource, dict[str, ChatInfo]]:
    """Read, validate and tokenize each language's chat sources (SOURCE strings or paths, elo.data.sources) with
    the tokenizer's chat template, hold out validation conversations, and return this rank's source plus
    per-language counts (rank 0 prints them).

    `mix` gives relative conversation shares (elo.data.text.parse_mix syntax); None mixes the languages equally (the
    paper's 1:1 target:English for SFT). `val_conversations` per language defaults to
    `default_val_conversations`; the held-out set depends on the data alone, not on the seed."""
    if not sources_by_lang:
        raise ValueError("no data given; expected at least one language with a source (--data LANG=SOURCE)")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}; expected a positive integer")
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat_template; SFT needs an instruct model's tokenizer "
                         "(or a chat-vector model, which takes the instruct model's)")
    langs = sorted(sources_by_lang)
    mix = {l: 1.0 for l in langs} if mix is None else resolve_mix(mix, langs)
    # read everything first: a bad record anywhere fails before any tokenizing
    chats = {l: [chat for source in sources_by_lang[l] for chat in read_chat_source(source)] for l in langs}
    train, val, info = {}, {}, {}
    for lang in langs:
        start = time.perf_counter()
        kept, counts = tokenize_language(tokenizer, chats[lang], seq_len)
        n_val = default_val_conversations(len(kept)) if val_conversations is None else val_conversations
        if n_val < 0 or len(kept) - n_val < 1:
            raise ValueError(f"language {lang!r} has {len(kept)} usable conversations (of {len(chats[lang])}; "
                             f"{counts}); need at least one for training besides {n_val} held out")
        order = epoch_order(0, f"val:{lang}", 0, len(kept))  # fixed, seed-free: files are often sorted by topic
        val[lang] = ChatSet.of([kept[i] for i in order[:n_val]])
        train[lang] = ChatSet.of([kept[i] for i in np.sort(order[n_val:])])
        both = [train[lang], val[lang]]
        info[lang] = ChatInfo(
            lang=lang, files=tuple(str(p) for p in sources_by_lang[lang]), conversations=len(chats[lang]), **counts,
            train=len(train[lang]), val=n_val, tokens=sum(len(s.ids) for s in both),
            trained_tokens=sum(int(s.trained.sum()) for s in both), seconds=time.perf_counter() - start)
        if rank == 0:
            i = info[lang]
            print(f"sft data {lang}: {i.conversations:,} conversations: {i.whole:,} whole, {i.truncated:,} truncated "
                  f"to {seq_len + 1} tokens, {i.skipped:,} skipped (first answer too long), {i.unaligned:,} "
                  f"skipped (no exact mask); {i.train:,} train / {i.val:,} val; {i.tokens:,} tokens, "
                  f"{i.trained_tokens:,} trained; {i.seconds:.1f}s", flush=True)
    return ChatSource(train, val, mix, seed, rank, world_size), info
