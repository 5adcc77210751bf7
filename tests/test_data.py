"""elo.data.text: reading, the token cache, train/validation windows, the language mix and the mixture sampler.

Unit tests use a byte-level fake tokenizer (token = UTF-8 byte + 1, EOS = 0) and synthetic token streams whose
values identify their position, so that every drawn window can be traced back to where it came from."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from elo.data import text as data
from elo.data.text import (Corpus, MixtureSampler, build_dataset, default_val_tokens, parse_data, parse_mix,
                      read_documents, resolve_mix, tokenize_files)
from tests.conftest import DATA, SAMPLE


class ByteTokenizer:
    """One token per UTF-8 byte (id = byte + offset), EOS = 0; counts encode_batch calls to detect cache hits."""

    def __init__(self, digest: str = "bytes-v1", offset: int = 1, vocab_size: int = 257, fail_on_call: int = 0):
        self.eos_id, self.vocab_size, self.digest = 0, vocab_size, digest
        self.offset, self.fail_on_call, self.calls = offset, fail_on_call, 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash while tokenizing")
        return [[b + self.offset for b in t.encode()] for t in texts]


def expected_tokens(texts: list[str], offset: int = 1) -> list[int]:
    return [t for text in texts for t in [b + offset for b in text.encode()] + [0]]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    return path


DOCS = ["첫 번째 문서입니다.", "second document\nwith two lines", "三つ目"]


# ---- reading ----

def test_read_jsonl_and_txt(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"body": "one"}\n\n{"body": "two\\nlines"}\n{"body": ""}\n', encoding="utf-8")
    assert list(read_documents(jsonl, field="body")) == ["one", "two\nlines"]  # blank line and empty text skipped

    txt = tmp_path / "b.txt"
    txt.write_text("\ufefffirst doc\nstill first\n\n\n  \nsecond doc\n\nthird, no final newline", encoding="utf-8")
    assert list(read_documents(txt)) == ["first doc\nstill first", "second doc", "third, no final newline"]


@pytest.mark.parametrize("name, content, error, message", [
    ("empty.jsonl", b"", ValueError, "{path}: no documents"),
    ("blank.txt", b"\n  \n\n", ValueError, "{path}: no documents"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": "\xff\xfe"}\n', ValueError, "{path}:3: not valid UTF-8"),
    ("bad.txt", b"ok\n\n\xc3(\n", ValueError, "{path}:3: not valid UTF-8"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "ok",\n', ValueError, "{path}:2: malformed JSON"),
    ("bad.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', ValueError, "{path}:2: no 'text' field"),
    ("bad.jsonl", b'{"text": "ok"}\n["text"]\n', ValueError, "{path}:2: no 'text' field"),
    ("bad.jsonl", b'{"text": "ok"}\n\n{"text": 7}\n', ValueError, "{path}:3: field 'text' is a int, expected a string"),
    ("data.csv", b"text\nok\n", ValueError, "{path}: unsupported file type '.csv'"),
])
def test_read_errors_name_file_and_line(tmp_path, name, content, error, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(error, match=re.escape(message.format(path=path))):
        list(read_documents(path))
    with pytest.raises(error, match=re.escape(message.format(path=path))):  # the same error through the pipeline
        tokenize_files([path], ByteTokenizer(), tmp_path / "cache")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(f"file {missing} not found")):
        list(read_documents(missing))
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_dataset({"ko": [missing]}, ByteTokenizer(), 4, {"ko": 1}, 0, cache_dir=tmp_path / "cache")


@pytest.mark.skipif(not (DATA / "pretrain").is_dir(), reason="shared/data/pretrain not present")
def test_real_corpora_read_completely():
    # record counts from shared/data/README.md
    for name, records in [("ko_wikipedia.jsonl", 6854), ("en_wikipedia.jsonl", 9740), ("ja_aozora.jsonl", 732)]:
        assert sum(1 for _ in read_documents(DATA / "pretrain" / name)) == records


# ---- the token cache ----

def test_tokens_are_documents_joined_by_eos(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", DOCS[:2])
    b = tmp_path / "b.txt"
    b.write_text(DOCS[2] + "\n\nfourth\n", encoding="utf-8")
    tokens, cache, seconds = tokenize_files([a, b], ByteTokenizer(), tmp_path / "cache")
    assert tokens.dtype == np.uint16 and not tokens.flags.writeable
    assert tokens.tolist() == expected_tokens(DOCS + ["fourth"])
    assert seconds is not None and cache.parent == tmp_path / "cache"


def test_token_dtype_and_tokenizer_checks(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", DOCS)
    no_eos = ByteTokenizer()
    no_eos.eos_id = None
    with pytest.raises(ValueError, match="the tokenizer has no eos_id"):
        tokenize_files([a], no_eos, tmp_path / "cache")
    tokens, _, _ = tokenize_files([a], ByteTokenizer(offset=70_000, vocab_size=70_300), tmp_path / "cache")
    assert tokens.dtype == np.uint32 and tokens.tolist() == expected_tokens(DOCS, offset=70_000)
    # a tokenizer whose ids exceed what its vocab_size promised must not wrap around silently
    with pytest.raises(ValueError, match="token id 70.* does not fit the cache dtype uint16"):
        tokenize_files([a], ByteTokenizer(digest="liar", offset=70_000, vocab_size=257), tmp_path / "cache")


def test_cache_reused_and_invalidated(tmp_path):
    cache_dir = tmp_path / "cache"
    a = write_jsonl(tmp_path / "a.jsonl", DOCS)
    first = ByteTokenizer()
    tokens, cache, seconds = tokenize_files([a], first, cache_dir)
    assert first.calls > 0 and seconds is not None

    again = ByteTokenizer()  # same digest, same file: memory-mapped, the tokenizer is never called
    tokens2, cache2, seconds2 = tokenize_files([a], again, cache_dir)
    assert again.calls == 0 and seconds2 is None and cache2 == cache
    assert np.array_equal(tokens, tokens2)

    other = ByteTokenizer(digest="bytes-v2")
    assert tokenize_files([a], other, cache_dir)[1] != cache and other.calls > 0

    write_jsonl(a, DOCS[:2] + ["changed"])  # same path, new content
    changed = ByteTokenizer()
    tokens3, cache3, _ = tokenize_files([a], changed, cache_dir)
    assert changed.calls > 0 and cache3 != cache and tokens3.tolist() == expected_tokens(DOCS[:2] + ["changed"])

    b = write_jsonl(tmp_path / "b.jsonl", DOCS, field="body")
    body = tokenize_files([b], ByteTokenizer(), cache_dir, field="body")[1]  # another field, another cache
    assert body != tokenize_files([a], ByteTokenizer(), cache_dir)[1]


def test_cache_keyed_by_format(tmp_path):
    """The same bytes read as .txt and as .jsonl are different documents, so they must not share a cache."""
    lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in DOCS)
    txt, jsonl = tmp_path / "a.txt", tmp_path / "a.jsonl"
    txt.write_text(lines, encoding="utf-8")
    jsonl.write_text(lines, encoding="utf-8")
    cache_dir = tmp_path / "cache"
    as_txt, txt_cache, _ = tokenize_files([txt], ByteTokenizer(), cache_dir)
    as_jsonl, jsonl_cache, seconds = tokenize_files([jsonl], ByteTokenizer(), cache_dir)
    assert jsonl_cache != txt_cache and seconds is not None
    assert as_txt.tolist() == expected_tokens([lines.rstrip("\n")]) and as_jsonl.tolist() == expected_tokens(DOCS)


def test_truncated_cache_is_rebuilt(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", DOCS)
    cache_dir = tmp_path / "cache"
    _, cache, _ = tokenize_files([a], ByteTokenizer(), cache_dir)
    size = cache.stat().st_size
    for cut in (size - 2, size // 2, 3, 0):  # cut mid-token, mid-stream, inside the header, empty
        with open(cache, "r+b") as f:
            f.truncate(cut)
        again = ByteTokenizer()
        with pytest.warns(UserWarning, match="is incomplete"):
            tokens, cache2, seconds = tokenize_files([a], again, cache_dir)
        assert cache2 == cache and again.calls > 0 and seconds is not None
        assert tokens.tolist() == expected_tokens(DOCS) and cache.stat().st_size == size


def test_data_directory_without_data_files_is_named(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "README.md").write_text("not data")
    with pytest.raises(FileNotFoundError, match=r".*corpus: a directory without \.jsonl, \.txt or \.parquet files"):
        tokenize_files([tmp_path / "corpus"], ByteTokenizer(), tmp_path / "cache")


def test_crash_while_writing_leaves_no_usable_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_CHUNK_CHARS", 1)  # one document per encode_batch call
    cache_dir = tmp_path / "cache"
    a = write_jsonl(tmp_path / "a.jsonl", DOCS)

    with pytest.raises(RuntimeError, match="simulated crash"):  # an exception mid-write: temp file removed
        tokenize_files([a], ByteTokenizer(fail_on_call=2), cache_dir)
    assert list(cache_dir.iterdir()) == []

    # a hard kill cannot clean up: the partial temp file stays, and must not be taken for the cache
    monkeypatch.setattr(data.os, "unlink", lambda path: None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tokenize_files([a], ByteTokenizer(fail_on_call=3), cache_dir)
    leftovers = [f for f in cache_dir.iterdir() if ".tmp-" in f.name]  # (and the killed writer's lock, reused)
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0

    fresh = ByteTokenizer()
    tokens, cache, seconds = tokenize_files([a], fresh, cache_dir)
    assert fresh.calls == len(DOCS) and seconds is not None and cache not in leftovers
    assert tokens.tolist() == expected_tokens(DOCS)


# ---- one language's windows ----

def test_windows_and_validation_split():
    tokens = np.arange(1000, dtype=np.uint32)
    c = Corpus("ko", tokens, seq_len=10, val_tokens=101)
    assert (c.split, c.num_train, c.num_val) == (899, 89, 10)  # train windows need index <= 898
    assert c.train_window(0).tolist() == list(range(11))
    assert c.train_window(88).tolist() == list(range(880, 891))
    assert c.val_window(0).tolist() == list(range(899, 910)) and c.val_window(9).tolist() == list(range(989, 1000))

    sampler = MixtureSampler({"ko": c}, {"ko": 1}, seed=0)
    val = list(sampler.val_batches("ko", 4))
    assert [b.inputs.shape[0] for b in val] == [4, 4, 2]
    inputs = torch.cat([b.inputs for b in val])
    assert inputs[:, 0].tolist() == list(range(899, 999, 10))
    assert all(torch.equal(b.targets, b.inputs + 1) and b.langs == ["ko"] * len(b.langs) for b in val)
    with pytest.raises(ValueError, match="no validation data for language 'ja'"):
        next(sampler.val_batches("ja", 4))


def test_default_val_tokens():
    assert default_val_tokens(50_000, 10) == 50 * 10 + 1  # 1% in whole sequences
    assert default_val_tokens(10_000_000, 10) == 64 * 10 + 1  # at most 64 sequences
    assert default_val_tokens(300, 10) == 1 * 10 + 1  # at least one
    assert Corpus("ko", np.zeros(50_000, np.uint16), 10).num_val == 50


def test_too_small_corpus_names_language_and_counts(tmp_path):
    ko = write_jsonl(tmp_path / "ko.jsonl", ["가나"])  # 6 bytes + EOS = 7 tokens
    en = write_jsonl(tmp_path / "en.jsonl", ["x" * 200])
    with pytest.raises(ValueError, match=re.escape("language 'ko' has 7 tokens; need at least 10")):
        build_dataset({"ko": [ko], "en": [en]}, ByteTokenizer(), 4, None, 0, cache_dir=tmp_path, val_tokens=5)
    with pytest.raises(ValueError, match="val_tokens=3; expected 0 or at least one sequence"):
        Corpus("en", np.zeros(100, np.uint16), 4, val_tokens=3)


# ---- the mix ----

def test_parse_mix():
    assert parse_mix("en:1,ko:9") == {"en": 1.0, "ko": 9.0}
    assert parse_mix(" en : 0.5 , ja:2 ") == {"en": 0.5, "ja": 2.0}


@pytest.mark.parametrize("spec, message", [
    ("en1,ko:9", "bad --mix entry 'en1'"),
    ("en:1,", "bad --mix entry ''"),
    (":1", "bad --mix entry ':1'"),
    ("en:", "bad --mix entry 'en:'"),
    ("en:x", "bad weight 'x' for 'en'"),
    ("en:0,ko:1", "weight 0 for 'en'"),
    ("en:-1", "weight -1 for 'en'"),
    ("en:inf", "weight inf for 'en'"),
    ("en:nan", "weight nan for 'en'"),
    ("en:1,ko:2,en:3", "language 'en' appears twice"),
])
def test_parse_mix_errors(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_mix(spec)


def test_resolve_mix():
    assert resolve_mix(None, ["ko", "en"]) == {"en": 1.0, "ko": 9.0}  # the paper's default
    assert resolve_mix(None, ["en", "ja"]) == {"en": 1.0, "ja": 9.0}
    assert resolve_mix({"en": 1, "ko": 3}, ["ko", "en"]) == {"en": 1, "ko": 3}
    for langs in (["ko"], ["ko", "ja"], ["en", "ko", "ja"], ["en"]):
        with pytest.raises(ValueError, match="no --mix given .* pass --mix"):
            resolve_mix(None, langs)
    with pytest.raises(ValueError, match="language 'ja' is in the mix but has no data"):
        resolve_mix({"en": 1, "ko": 9, "ja": 1}, ["en", "ko"])
    with pytest.raises(ValueError, match="language 'ko' has data but no weight"):
        resolve_mix({"en": 1}, ["en", "ko"])


def test_parse_data():
    assert parse_data(["ko=a.jsonl", "en=b.txt", "ko=hf://datasets/o/n/*.parquet"]) == {
        "ko": ["a.jsonl", "hf://datasets/o/n/*.parquet"], "en": ["b.txt"]}
    for bad in ("ko", "=a.jsonl", "ko="):
        with pytest.raises(ValueError, match=re.escape(f"bad --data {bad!r}")):
            parse_data([bad])


# ---- the mixture sampler ----

def corpora(num_train: dict[str, int], seq_len: int = 4) -> dict[str, Corpus]:
    """Language k's tokens are 1000*k + position, so a window's first token names its language and index."""
    return {lang: Corpus(lang, np.arange(n * seq_len + 1, dtype=np.uint32) + 1000 * k, seq_len, val_tokens=0)
            for k, (lang, n) in enumerate(sorted(num_train.items()))}


def window_ids(batch) -> list[tuple[str, int]]:
    return [(lang, int(x) % 1000 // 4) for lang, x in zip(batch.langs, batch.inputs[:, 0])]


@pytest.mark.parametrize("mix", [
    {"en": 1, "ko": 9},
    {"a": 1, "b": 2, "c": 3.5},
    {"a": 0.3, "b": 0.01, "c": 5, "d": 1, "e": 2.2},
    {"a": 8, "b": 8, "c": 0.1, "d": 1},  # a largest-deficit rule drifts past one sequence on these two
    {"a": 20, "b": 20, "c": 2, "d": 0.5},
])
def test_mix_exact_at_every_prefix(mix):
    sampler = MixtureSampler(corpora({lang: 37 for lang in mix}), mix, seed=1)
    share = {lang: w / sum(mix.values()) for lang, w in mix.items()}
    counts = dict.fromkeys(mix, 0)
    tokens = dict.fromkeys(mix, 0)
    for n in range(1, 3001):
        batch = sampler.next_batch(1)
        counts[batch.langs[0]] += 1
        tokens[batch.langs[0]] += batch.targets.numel()
        worst = max(abs(counts[lang] - n * share[lang]) for lang in mix)
        assert worst < 1, f"after {n} sequences counts {counts} are {worst:.3f} sequences off {share}"
    total = sum(tokens.values())
    for lang in mix:  # the requested token ratio over the run, within 0.5% of each language's share
        assert abs(tokens[lang] / total - share[lang]) <= 0.005 * share[lang] + 1 / 3000


def test_each_epoch_is_a_new_permutation():
    sampler = MixtureSampler(corpora({"en": 5, "ko": 13}), {"en": 1, "ko": 3}, seed=7)
    drawn = [item for _ in range(80) for item in window_ids(sampler.next_batch(1))]
    ko = [i for lang, i in drawn if lang == "ko"][:52]  # four epochs of 13
    epochs = [ko[e * 13:(e + 1) * 13] for e in range(4)]
    for order in epochs:
        assert sorted(order) == list(range(13))  # every window once, none repeated
    assert len({tuple(order) for order in epochs}) == 4  # a new order every epoch
    assert sampler.epochs["ko"] == pytest.approx(60 / 13)

    other_seed = MixtureSampler(corpora({"en": 5, "ko": 13}), {"en": 1, "ko": 3}, seed=8)
    assert [item for _ in range(80) for item in window_ids(other_seed.next_batch(1))] != drawn


@pytest.mark.parametrize("world_size, micro", [(2, 3), (4, 1), (3, 2)])
def test_ranks_split_the_single_process_stream(world_size, micro):
    data_ = corpora({"en": 50, "ko": 200})
    mix = {"en": 1, "ko": 9}
    single = MixtureSampler(data_, mix, seed=3)
    ranks = [MixtureSampler(data_, mix, seed=3, rank=r, world_size=world_size) for r in range(world_size)]
    seen = []
    for _ in range(10):
        whole = single.next_batch(micro * world_size)
        parts = [s.next_batch(micro) for s in ranks]
        for r, part in enumerate(parts):  # rank r holds global items r, r + w, ... of the same global batch
            assert torch.equal(part.inputs, whole.inputs[r::world_size])
            assert torch.equal(part.targets, whole.targets[r::world_size])
            assert part.langs == whole.langs[r::world_size]
            seen += window_ids(part)
    assert len(seen) == len(set(seen)) == 10 * micro * world_size  # disjoint across ranks (all within epoch 1)
    assert all(s.state_dict() == single.state_dict() for s in ranks)  # one shared position


def test_resume_continues_identically():
    data_ = corpora({"en": 6, "ko": 11})
    mix = {"en": 1, "ko": 2}
    a = MixtureSampler(data_, mix, seed=5)
    for _ in range(7):
        a.next_batch(3)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # as the trainer checkpoints it
    expected = [a.next_batch(3) for _ in range(10)]  # crosses epoch boundaries of both languages

    b = MixtureSampler(data_, mix, seed=5)
    b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    for want in expected:
        got = b.next_batch(3)
        assert torch.equal(got.inputs, want.inputs) and got.langs == want.langs

    state = a.state_dict()
    with pytest.raises(ValueError, match="saved with seed=5, this run has seed=6"):
        MixtureSampler(data_, mix, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with mix .* resume with the same mix"):
        MixtureSampler(data_, {"en": 1, "ko": 3}, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with train_sequences="):
        MixtureSampler(corpora({"en": 6, "ko": 12}), mix, seed=5).load_state_dict(state)


# ---- the entry point ----

def test_build_dataset(tmp_path, capsys):
    ko = write_jsonl(tmp_path / "ko.jsonl", ["한국어 문서 " * 20] * 10)
    en = write_jsonl(tmp_path / "en.jsonl", ["an english document " * 10] * 10)
    sampler, info = build_dataset({"ko": [ko], "en": [en]}, ByteTokenizer(), 16, None, seed=0,
                                  cache_dir=tmp_path / "cache")
    assert sampler.mix == {"en": 0.1, "ko": 0.9}
    assert info["ko"].tokens == 10 * (len(("한국어 문서 " * 20).encode()) + 1) and not info["ko"].cached
    assert info["ko"].val_sequences == 2 and info["ko"].tokens_per_s > 0  # 1% of 3,410 tokens = 2 sequences of 16
    assert info["en"].train_sequences == (info["en"].tokens - 17 - 1) // 16
    out = capsys.readouterr().out
    assert "data ko:" in out and "tokens/s" in out

    batch = sampler.next_batch(10)
    assert batch.inputs.dtype == torch.int64 and batch.inputs.shape == batch.targets.shape == (10, 16)
    assert batch.langs.count("en") == 1
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])

    _, again = build_dataset({"ko": [ko], "en": [en]}, ByteTokenizer(), 16, None, seed=0, cache_dir=tmp_path / "cache")
    assert again["ko"].cached and again["ko"].tokens_per_s is None and "from cache" in capsys.readouterr().out


def test_rank0_tokenizes_before_the_other_ranks(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: events.append(("barrier", tok.calls)))
    en = write_jsonl(tmp_path / "en.jsonl", ["x" * 100])
    tok = ByteTokenizer()
    build_dataset({"en": [en]}, tok, 8, {"en": 1}, 0, rank=0, world_size=2, cache_dir=tmp_path)
    assert events == [("barrier", 1)]  # rank 0: tokenize, then release the others
    tok = ByteTokenizer()
    build_dataset({"en": [en]}, tok, 8, {"en": 1}, 0, rank=1, world_size=2, cache_dir=tmp_path)
    assert events[1:] == [("barrier", 0)] and tok.calls == 0  # rank 1: wait, then read rank 0's cache


def test_real_tokenizer_cache_matches_encode(tmp_path, default_model_dir):
    from elo.hf.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    texts = {}
    for lang, name in [("ko", "ko_wikipedia.jsonl"), ("en", "en_wikipedia.jsonl")]:
        docs = [d for _, d in zip(range(20), read_documents(SAMPLE / "pretrain" / name))]
        texts[lang] = docs
        write_jsonl(tmp_path / name, docs)
    sampler, info = build_dataset({"ko": [tmp_path / "ko_wikipedia.jsonl"], "en": [tmp_path / "en_wikipedia.jsonl"]},
                                  tok, 128, None, seed=0, cache_dir=tmp_path / "cache")
    streams = {lang: [t for d in docs for t in tok.encode(d) + [tok.eos_id]] for lang, docs in texts.items()}
    for lang, docs in texts.items():
        tokens = sampler.corpora[lang].tokens
        assert tokens.dtype == np.uint16  # SmolLM2: 49152 ids
        assert tokens.tolist() == streams[lang]  # encode_batch in chunks == encode per document, EOS after each
        first = tokens.tolist().index(tok.eos_id)
        assert tok.decode(tokens[:first].tolist()) == docs[0]
    batch = sampler.next_batch(4)
    for inputs, targets, lang in zip(batch.inputs.tolist(), batch.targets.tolist(), batch.langs):
        stream = streams[lang]
        start = next(i for i in range(0, len(stream), 128) if stream[i:i + 128] == inputs)  # at a window boundary
        assert stream[start + 1:start + 129] == targets


def test_text_windows_cut_one_stream():
    texts = ["ab", "cde", "f"]
    windows = list(data.text_windows(texts, ByteTokenizer(), 3))
    assert [w.shape for w in windows] == [(1, 3), (1, 3), (1, 3)]
    assert torch.cat(windows, 1)[0].tolist() == expected_tokens(texts) and windows[0].dtype == torch.long
    assert [w.shape[1] for w in data.text_windows(texts, ByteTokenizer(), 4)] == [4, 4, 1]
    for bad, message in (("abc", "a single string"), (["a", 3], "must be strings; got a int")):
        with pytest.raises(ValueError, match=message):
            list(data.text_windows(bad, ByteTokenizer(), 3))
