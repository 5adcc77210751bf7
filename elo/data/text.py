"""Pretraining data: read text sources (elo.data.sources), tokenize them once into a cached memmap, pack each
language into fixed-length windows, and draw a deterministic, resumable, rank-sharded mixture of languages in exact
token proportions.

The training loop needs two calls:

    sampler, info = build_dataset({"ko": [...], "en": [...]}, tokenizer, seq_len, mix, seed, rank, world_size)
    batch = sampler.next_batch(micro_batch_size)   # Batch(inputs [B, T], targets [B, T], langs)

and `sampler.state_dict()` / `load_state_dict()` for checkpoints, `sampler.val_batches(lang, B)` for evaluation.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
import warnings
from dataclasses import dataclass
from fractions import Fraction
from itertools import chain
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Protocol

import numpy as np
import torch

from elo.data.sources import Listing, Shard, parse_source
from elo.tools.files import atomic_file, cache_root, one_at_a_time

_CHUNK_CHARS = 1 << 20  # characters handed to encode_batch at a time: big enough for its threads, small in memory
_MAX_VAL_SEQUENCES = 64
_CACHE_FORMAT = 2  # bump when the cache layout or the way a file's documents are read changes
# A cache file is this header (magic, token count as little-endian uint64), then the tokens. The count is written
# last, so a file cut short, or one whose count was never filled in, fails the size check and is tokenized again.
_CACHE_MAGIC = b"elotok02"
_HEADER = struct.Struct("<8sQ")


class TextTokenizer(Protocol):
    """What the pipeline needs from a tokenizer (elo.hf.tokenizer.Tokenizer has it)."""

    eos_id: int | None
    vocab_size: int
    digest: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


@dataclass
class Batch:
    inputs: torch.Tensor  # LongTensor [B, T]
    targets: torch.Tensor  # LongTensor [B, T]: the next token where trained, -1 where not (prompts)
    langs: list[str]  # language of each row, or of each packed document
    documents: list[int] | None = None  # packed: one row holding documents of these lengths, each computed alone

    @property
    def num_tokens(self) -> int:
        """Tokens the model reads (no batch holds padding): what throughput and MFU count."""
        return self.inputs.numel()

    def loss_by_language(self, per_token: torch.Tensor) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(language, summed loss, trained tokens) of each row, or of each packed document."""
        trained = self.targets >= 0
        if self.documents is None:
            return zip(self.langs, per_token.sum(1), trained.sum(1))
        return zip(self.langs, [p.sum() for p in per_token[0].split(self.documents)],
                   [t.sum() for t in trained[0].split(self.documents)])


@dataclass(frozen=True)
class CorpusInfo:
    lang: str
    files: tuple[str, ...]
    cache_path: str
    tokens: int
    train_sequences: int
    val_sequences: int
    cached: bool  # True: memory-mapped from an earlier run, nothing tokenized
    seconds: float  # time to read + tokenize + write the cache (0.0 when cached)
    tokens_per_s: float | None  # None when cached


# ---- reading ----

def read_documents(source: str | os.PathLike, field: str = "text") -> Iterator[str]:
    """Documents of a SOURCE (elo.data.sources: local .jsonl/.txt/.parquet files, a directory or glob of them, or a
    Hub dataset), shard by shard: the string `field` of each JSON line or Parquet row, or the blank-line separated
    documents of a .txt file. Empty documents are skipped; a source with none is an error. (A `?tokens=` limit
    counts tokens, so `tokenize_files` applies it.)"""
    listing = parse_source(source).list_shards()
    documents = chain.from_iterable(_shard_documents(shard, field) for shard in listing.shards)
    first = next(documents, None)
    if first is None:
        raise ValueError(_no_documents(listing))
    yield first
    yield from documents


def _shard_documents(shard: Shard, field: str) -> Iterator[str]:
    for number, record in shard.records(columns=[field]):
        text = record if shard.suffix == ".txt" else _record_text(record, field, f"{shard}:{number}")
        if text:
            yield text


def _record_text(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        raise ValueError(f"{where}: no {field!r} field in the JSON line")
    text = record[field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {field!r} is a {type(text).__name__}, expected a string")
    return text


def _no_documents(listing: Listing) -> str:
    return f"{listing.source}: no documents" + (" pass its filters" if listing.source.where else "")


# ---- tokenizing into the cache ----

def default_cache_dir() -> Path:
    return cache_root() / "data"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenize_files(sources: Iterable[str | os.PathLike], tokenizer: TextTokenizer,
                   cache_dir: str | os.PathLike | None = None,
                   field: str = "text") -> tuple[np.ndarray, Path, float | None]:
    """The token stream of `sources` (SOURCE strings or paths, elo.data.sources) in order, EOS after every document,
    as a read-only memmap of the cache file. A source with `?tokens=N` is read shard by shard and stops at the first
    document that reaches N of its tokens, so its later shards are never opened or downloaded.

    The cache file is named by a hash of the reader version, the tokenizer digest, `field`, each shard's format
    (suffix) and contents (a Hub shard: its name, which holds the dataset's commit) and any filters or token limits,
    so a changed file, dataset revision, format or tokenizer is tokenized afresh. It is written to a temp file and
    renamed, and a hit is checked against the token count in its header, so neither an interrupted run nor a
    truncated copy is ever taken as complete. Returns (tokens, cache file, seconds spent, or None if it was cached).
    """
    listings = [parse_source(s).list_shards() for s in sources]
    if not listings:
        raise ValueError("no data files given")
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no eos_id; it is needed to separate documents")
    dtype = token_dtype(tokenizer.vocab_size)
    identity = {"format": _CACHE_FORMAT, "tokenizer": tokenizer.digest, "eos": tokenizer.eos_id, "dtype": dtype.name,
                "field": field, "files": [shard.identity() for listing in listings for shard in listing.shards]}
    limits = [[dict(listing.source.where), listing.source.tokens] for listing in listings]
    if any(where or tokens for where, tokens in limits):  # absent otherwise: earlier caches keep their names
        identity["limits"] = limits
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = cache_dir / f"{key}.{dtype.name}.bin"
    with one_at_a_time(cache):  # two ranks or jobs tokenizing one corpus: the second waits and reads the first's cache
        if cache.is_file():
            tokens = _open_tokens(cache, dtype)
            if tokens is not None:
                return tokens, cache, None
            warnings.warn(f"token cache {cache} is incomplete (truncated or damaged); tokenizing again", stacklevel=2)

        start = time.perf_counter()
        with atomic_file(cache, "wb") as f:
            f.write(_HEADER.pack(_CACHE_MAGIC, 0))
            count = sum(_write_tokens(f, listing, tokenizer, field, dtype) for listing in listings)
            f.seek(0)
            f.write(_HEADER.pack(_CACHE_MAGIC, count))
        return _open_tokens(cache, dtype), cache, time.perf_counter() - start


def _write_tokens(f: BinaryIO, listing: Listing, tokenizer: TextTokenizer, field: str, dtype: np.dtype) -> int:
    """Append one source's tokens to `f`, shard by shard (chunks never span two shards, so none is opened early);
    returns how many were written."""
    limit = listing.source.tokens
    written = 0
    for shard in listing.shards:
        for texts in _chunks(_shard_documents(shard, field)):
            encoded = tokenizer.encode_batch(texts)
            if limit is not None:  # keep documents up to the first whose end reaches the limit
                ends = written + np.cumsum([len(ids) + 1 for ids in encoded])
                encoded = encoded[:int(np.searchsorted(ends, limit)) + 1]
            packed = _pack(encoded, tokenizer.eos_id, dtype)
            f.write(packed.tobytes())
            written += len(packed)
            if limit is not None and written >= limit:
                return written
    if written == 0:
        raise ValueError(_no_documents(listing))
    return written


def _chunks(docs: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= _CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _pack(encoded: list[list[int]], eos: int, dtype: np.dtype) -> np.ndarray:
    total = sum(len(ids) for ids in encoded) + len(encoded)
    flat = np.fromiter(chain.from_iterable(chain(ids, (eos,)) for ids in encoded), dtype=np.int64, count=total)
    if flat.min() < 0 or flat.max() > np.iinfo(dtype).max:
        bad = flat.min() if flat.min() < 0 else flat.max()
        raise ValueError(f"token id {bad} does not fit the cache dtype {dtype.name} (tokenizer vocab_size)")
    return flat.astype(dtype)


def _open_tokens(path: Path, dtype: np.dtype) -> np.ndarray | None:
    """The cached tokens, memory-mapped read-only; None unless the file holds exactly the count its header states."""
    with open(path, "rb") as f:
        header = f.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    magic, count = _HEADER.unpack(header)
    if magic != _CACHE_MAGIC or count == 0 or path.stat().st_size != _HEADER.size + count * dtype.itemsize:
        return None
    return np.asarray(np.memmap(path, dtype=dtype, mode="r", offset=_HEADER.size, shape=(count,)))


def text_windows(texts: Iterable[str], tokenizer: TextTokenizer, seq_len: int) -> Iterator[torch.Tensor]:
    """`texts` as one token stream (EOS after each text), cut into [1, seq_len] id batches, the last one shorter:
    for passes that read hidden states (elo.fit_middle, elo.extensions.layer_scores). Tokenizes lazily, text by text."""
    if isinstance(texts, str):
        raise ValueError("texts is a single string; expected a list of texts")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}; expected a positive integer")
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no eos_id; it is needed to separate texts")
    stream: list[int] = []
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"texts must be strings; got a {type(text).__name__}")
        stream += tokenizer.encode_batch([text])[0] + [tokenizer.eos_id]
        while len(stream) >= seq_len:
            yield torch.tensor([stream[:seq_len]])
            del stream[:seq_len]
    if stream:
        yield torch.tensor([stream])


# ---- one language: training windows and held-out validation ----

def default_val_tokens(num_tokens: int, seq_len: int) -> int:
    """1% of the tokens, rounded down to whole sequences, at least 1 and at most 64 sequences (plus the one extra
    token that the last target needs)."""
    sequences = min(_MAX_VAL_SEQUENCES, max(1, num_tokens // 100 // seq_len))
    return sequences * seq_len + 1


class Corpus:
    """One language's token stream. The last `val_tokens` tokens are held out for validation; the rest is packed
    into `seq_len + 1`-token windows with stride `seq_len` (input w[:-1], target w[1:]); a tail shorter than a
    window is unused. `val_tokens=None` takes `default_val_tokens`; 0 holds nothing out."""

    def __init__(self, lang: str, tokens: np.ndarray, seq_len: int, val_tokens: int | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len}; expected a positive integer")
        n = len(tokens)
        if val_tokens is None:
            val_tokens = default_val_tokens(n, seq_len)
        elif val_tokens < 0 or 0 < val_tokens < seq_len + 1:
            raise ValueError(f"val_tokens={val_tokens}; expected 0 or at least one sequence ({seq_len + 1} tokens)")
        need = val_tokens + seq_len + 1
        if n < need:
            raise ValueError(f"language {lang!r} has {n} tokens; need at least {need} (one training sequence of "
                             f"{seq_len + 1} tokens plus {val_tokens} held out for validation)")
        self.lang, self.tokens, self.seq_len, self.val_tokens = lang, tokens, seq_len, val_tokens
        self.split = n - val_tokens  # tokens[:split] train, tokens[split:] validation
        self.num_train = (self.split - 1) // seq_len
        self.num_val = max(val_tokens - 1, 0) // seq_len

    def train_window(self, i: int) -> np.ndarray:
        return self.tokens[i * self.seq_len:(i + 1) * self.seq_len + 1]

    def val_window(self, i: int) -> np.ndarray:
        start = self.split + i * self.seq_len
        return self.tokens[start:start + self.seq_len + 1]


# ---- the language mix ----

def parse_data(specs: Iterable[str]) -> dict[str, list[str]]:
    """`["ko=a.jsonl", "ko=hf://datasets/o/n/*.parquet", "en=c.txt"]` (repeated --data LANG=SOURCE) ->
    {"ko": ["a.jsonl", "hf://datasets/o/n/*.parquet"], "en": ["c.txt"]}: SOURCE strings (elo.data.sources)."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        lang, sep, source = spec.partition("=")
        if not sep or not lang.strip() or not source.strip():
            raise ValueError(f"bad --data {spec!r}; expected LANG=SOURCE, e.g. ko=ko_wikipedia.jsonl")
        out.setdefault(lang.strip(), []).append(source.strip())
    return out


def parse_mix(spec: str) -> dict[str, float]:
    """`"en:1,ko:9"` -> {"en": 1.0, "ko": 9.0}: relative token shares, any positive scale."""
    mix: dict[str, float] = {}
    for item in spec.split(","):
        lang, sep, weight = (s.strip() for s in item.partition(":"))
        if not sep or not lang or not weight:
            raise ValueError(f"bad --mix entry {item.strip()!r} in {spec!r}; expected LANG:WEIGHT,... e.g. en:1,ko:9")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(
                f"bad weight {weight!r} for {lang!r} in --mix {spec!r}; expected a positive number") from None
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"weight {weight} for {lang!r} in --mix {spec!r}; expected a positive number")
        if lang in mix:
            raise ValueError(f"language {lang!r} appears twice in --mix {spec!r}")
        mix[lang] = w
    return mix


def resolve_mix(mix: dict[str, float] | None, langs: Iterable[str]) -> dict[str, float]:
    """Check `mix` against the languages that have data. Without a mix, English ("en") plus exactly one other
    language gets the paper's 1:9 English:target mix; anything else needs an explicit mix."""
    langs = sorted(langs)
    if mix is None:
        if len(langs) == 2 and "en" in langs:
            target = langs[0] if langs[1] == "en" else langs[1]
            return {"en": 1.0, target: 9.0}
        raise ValueError(f"no --mix given for data languages {langs}; the default 1:9 mix needs 'en' plus exactly one "
                         f"other language, so pass --mix, e.g. --mix {','.join(f'{l}:1' for l in langs)}")
    for lang in mix:
        if lang not in langs:
            raise ValueError(f"language {lang!r} is in the mix but has no data; data languages are {langs}")
    for lang in langs:
        if lang not in mix:
            raise ValueError(f"language {lang!r} has data but no weight in the mix {mix}")
    for lang, w in mix.items():
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"weight {w} for {lang!r} in the mix; expected a positive number")
    return dict(mix)


# ---- the language schedule (shared with elo.data.chat_data) ----

def integer_weights(mix: dict[str, float]) -> dict[str, int]:
    """Exact integer weights proportional to `mix`, so that a schedule is free of rounding and identical on every
    machine."""
    shares = {l: Fraction(str(w)) for l, w in mix.items()}
    scale = math.lcm(*(s.denominator for s in shares.values()))
    return {l: int(s * scale) for l, s in shares.items()}


def next_language(n: int, counts: dict[str, int], weight: dict[str, int], total: int) -> str:
    """The language of item n (1-based) given the items each language has so far: the one whose next item is due
    soonest (earliest deadline) among those not ahead of their share; ties go to the first in `counts` order."""
    lang = None
    for l, c in counts.items():
        w = weight[l]
        # eligible: not ahead of its share; due: the (c+1)-th item is needed by step (c+1) / share
        if n * w > c * total and (lang is None or (c + 1) * weight[lang] < (counts[lang] + 1) * w):
            lang = l
    assert lang is not None  # shares sum to 1, so some language is always behind
    return lang


def epoch_order(seed: int, lang: str, epoch: int, size: int) -> np.ndarray:
    """The order in which epoch `epoch` visits a language's `size` items."""
    lang_id = int.from_bytes(hashlib.sha256(lang.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, lang_id, epoch]).permutation(size)


# ---- the mixture sampler ----

class LanguageMix:
    """The language schedule shared by the pretraining and chat streams: an endless global stream of items, defined
    by (items per language, mix, seed) alone, identical on every rank.

    Item n (1-based) goes to the language whose next item is due soonest (earliest deadline) among those not ahead
    of their share, so after every prefix of n items each language has count within one item of n * share (a plain
    largest-deficit rule drifts past one with 4+ languages). Ties go to the language first in sorted order.
    Subclasses say how many training items each language has (`_sizes`) and what an item is."""

    _size_key = "train_items"  # how state_dict names the per-language sizes

    def __init__(self, langs: Iterable[str], mix: dict[str, float], seed: int, rank: int, world_size: int):
        self.langs = sorted(langs)
        if set(mix) != set(self.langs):
            raise ValueError(f"mix languages {sorted(mix)} differ from data languages {self.langs}")
        if seed < 0:
            raise ValueError(f"seed={seed}; expected a non-negative integer")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} with world_size={world_size}; expected 0 <= rank < world_size")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        total = sum(mix.values())
        self.mix = {l: mix[l] / total for l in self.langs}  # normalised shares
        self._weight = integer_weights({l: mix[l] for l in self.langs})
        self._total = sum(self._weight.values())
        self.position = 0  # global items drawn so far (all ranks together)
        self.counts = {l: 0 for l in self.langs}  # global items drawn so far per language

    def _sizes(self) -> dict[str, int]:
        raise NotImplementedError

    @property
    def epochs(self) -> dict[str, float]:
        """Passes over each language's training items so far (global stream)."""
        sizes = self._sizes()
        return {l: self.counts[l] / sizes[l] for l in self.langs}

    def _next(self) -> tuple[str, int, int]:
        """Advance the stream by one item: (language, epoch, index within that epoch's order)."""
        lang = next_language(self.position + 1, self.counts, self._weight, self._total)
        epoch, i = divmod(self.counts[lang], self._sizes()[lang])
        self.counts[lang] += 1
        self.position += 1
        return lang, epoch, i

    def state_dict(self) -> dict:
        """Position in the global stream (the same on every rank), plus what must match on resume."""
        return {"position": self.position, "counts": dict(self.counts), "seed": self.seed, "mix": dict(self.mix),
                self._size_key: self._sizes()}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", self._size_key):
            if state.get(key) != mine[key]:
                raise ValueError(f"data state was saved with {key}={state.get(key)}, this run has {key}={mine[key]}; "
                                 f"resume with the same data, seq_len and seed")
        if set(state["mix"]) != set(self.mix) or any(
                not math.isclose(state["mix"][l], self.mix[l], rel_tol=1e-9) for l in self.langs):
            raise ValueError(f"data state was saved with mix {state['mix']}, this run has {self.mix}; "
                             f"resume with the same mix")
        if sum(state["counts"].values()) != state["position"]:
            raise ValueError(f"corrupt data state: counts {state['counts']} do not sum to position {state['position']}")
        self.position = state["position"]
        self.counts = {l: state["counts"][l] for l in self.langs}


class MixtureSampler(LanguageMix):
    """The pretraining stream: items are training windows of seq_len + 1 tokens, so the mix is exact in tokens.

    Within a language: epoch e visits every training window once, in a permutation seeded by (seed, lang, e).
    Ranks: rank r of world_size w takes global items r, r + w, r + 2w, ... (strided). One micro-batch of B
    per rank consumes the next B * w global items, so w ranks at micro-batch B see together exactly the items a
    single process sees at micro-batch B * w.
    """

    _size_key = "train_sequences"

    def __init__(self, corpora: dict[str, Corpus], mix: dict[str, float], seed: int, rank: int = 0,
                 world_size: int = 1):
        if len({c.seq_len for c in corpora.values()}) != 1:
            raise ValueError(f"corpora have different seq_len: { {l: c.seq_len for l, c in corpora.items()} }")
        super().__init__(corpora, mix, seed, rank, world_size)
        self.corpora = corpora
        self.seq_len = next(iter(corpora.values())).seq_len
        self._perms: dict[str, tuple[int, np.ndarray]] = {}  # lang -> (epoch, permutation of its windows)

    def _sizes(self) -> dict[str, int]:
        return {l: self.corpora[l].num_train for l in self.langs}

    def next_batch(self, batch_size: int) -> Batch:
        """This rank's next micro-batch of `batch_size` sequences (advances the global stream by batch_size * world)."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected a positive integer")
        start = self.position
        mine = []
        for t in range(batch_size * self.world_size):
            item = self._draw()
            if (start + t) % self.world_size == self.rank:
                mine.append(item)
        return _batch([self.corpora[l].train_window(i) for l, i in mine], [l for l, _ in mine])

    def val_batches(self, lang: str, batch_size: int) -> Iterator[Batch]:
        """All held-out windows of `lang` in order (the same on every rank); the last batch may be smaller."""
        if lang not in self.corpora:
            raise ValueError(f"no validation data for language {lang!r}; languages are {self.langs}")
        corpus = self.corpora[lang]
        for s in range(0, corpus.num_val, batch_size):
            idx = range(s, min(s + batch_size, corpus.num_val))
            yield _batch([corpus.val_window(i) for i in idx], [lang] * len(idx))

    def _draw(self) -> tuple[str, int]:
        lang, epoch, i = self._next()
        cached = self._perms.get(lang)
        if cached is None or cached[0] != epoch:
            cached = (epoch, epoch_order(self.seed, lang, epoch, self.corpora[lang].num_train))
            self._perms[lang] = cached
        return lang, int(cached[1][i])


def _batch(windows: list[np.ndarray], langs: list[str]) -> Batch:
    x = torch.from_numpy(np.stack(windows).astype(np.int64))
    return Batch(x[:, :-1].contiguous(), x[:, 1:].contiguous(), langs)


# ---- entry point ----

def build_dataset(sources_by_lang: dict[str, list[str | os.PathLike]], tokenizer: TextTokenizer, seq_len: int,
                  mix: dict[str, float] | None, seed: int, rank: int = 0, world_size: int = 1,
                  cache_dir: str | os.PathLike | None = None, field: str = "text",
                  val_tokens: int | None = None) -> tuple[MixtureSampler, dict[str, CorpusInfo]]:
    """Tokenize (or memory-map from the cache) each language's sources (SOURCE strings or paths, elo.data.sources),
    hold out validation, and return this rank's sampler plus per-language info. Rank 0 prints one line per language.

    Under an initialised torch.distributed group with world_size > 1, rank 0 tokenizes first and the other ranks
    wait at a barrier, then read the cache (this function calls barrier() exactly once on every rank).
    """
    if not sources_by_lang:
        raise ValueError("no data given; expected at least one language with a source (--data LANG=SOURCE)")
    mix = resolve_mix(mix, sources_by_lang)
    dist = torch.distributed
    shared = world_size > 1 and dist.is_available() and dist.is_initialized()
    if shared and rank != 0:
        dist.barrier()
    corpora, info = {}, {}
    for lang in sorted(sources_by_lang):
        sources = sources_by_lang[lang]
        tokens, cache, seconds = tokenize_files(sources, tokenizer, cache_dir, field)
        corpus = corpora[lang] = Corpus(lang, tokens, seq_len, val_tokens)
        info[lang] = CorpusInfo(
            lang=lang, files=tuple(str(s) for s in sources), cache_path=str(cache), tokens=len(tokens),
            train_sequences=corpus.num_train, val_sequences=corpus.num_val, cached=seconds is None,
            seconds=seconds or 0.0, tokens_per_s=None if seconds is None else len(tokens) / max(seconds, 1e-9))
        if rank == 0:
            how = ("from cache" if seconds is None
                   else f"tokenized in {seconds:.1f}s ({info[lang].tokens_per_s:,.0f} tokens/s)")
            print(f"data {lang}: {len(tokens):,} tokens {how}; {corpus.num_train:,} train / {corpus.num_val} val "
                  f"sequences of {seq_len}; {cache}", flush=True)
    if shared and rank == 0:
        dist.barrier()
    return MixtureSampler(corpora, mix, seed, rank, world_size), info
