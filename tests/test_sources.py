"""elo.data.sources: local files, directories and globs, and Hugging Face Hub datasets read offline from a
Hub-layout cache built here (blobs, snapshots/<commit>/ links to them, refs/main), through the token cache, the
pretraining sampler and the chat source."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub import constants

from elo.data import sources
from elo.data.chat_data import build_chat_source, read_chat_source
from elo.data.sources import parse_source
from elo.data.text import build_dataset, read_documents, tokenize_files
from elo.hf.tokenizer import load_tokenizer
from tests.test_data import ByteTokenizer, expected_tokens, write_jsonl

KO = [f"한국어 문서 {i}: " + "가나다라 " * (i % 5 + 1) for i in range(24)]
EN = [f"english document {i} " * 3 for i in range(24)]


def parquet_bytes(**columns) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def text_rows(texts: list[str]) -> bytes:
    """A Wikipedia-like shard: the text plus columns elo does not read."""
    return parquet_bytes(id=[str(i) for i in range(len(texts))], title=[t[:5] for t in texts], text=texts)


class HubCache:
    """Datasets laid out as huggingface_hub's cache keeps them."""

    def __init__(self, root: Path):
        self.root = root

    def publish(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Write a commit holding `files` and point refs/main at it; returns the commit."""
        repo = self.root / f"datasets--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(json.dumps({p: hashlib.sha256(b).hexdigest() for p, b in files.items()}).encode())
        commit = commit.hexdigest()
        for path, content in files.items():
            blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(content)
            link = repo / "snapshots" / commit / path
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return commit


@pytest.fixture
def hub(tmp_path, monkeypatch) -> HubCache:
    """An empty offline Hub cache (HF_HUB_CACHE, HF_HUB_OFFLINE=1). huggingface_hub reads both variables once, at
    import, into huggingface_hub.constants, so those are set too."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return HubCache(cache)


@pytest.fixture
def fetched(monkeypatch) -> list[str]:
    """The Hub files fetched (hf_hub_download calls), in order."""
    calls = []

    def counting(repo_id, filename, **kwargs):
        calls.append(filename)
        return download(repo_id, filename, **kwargs)

    download = sources.hf_hub_download
    monkeypatch.setattr(sources, "hf_hub_download", counting)
    return calls


# ---- parsing ----

def test_parse_source(tmp_path):
    hub = parse_source("hf://datasets/lightblue/tagengo-gpt4@refs%2Fconvert%2Fparquet/data/*.parquet"
                       "?language=Korean&tokens=2.5M")
    assert (hub.repo_id, hub.revision, hub.location) == ("lightblue/tagengo-gpt4", "refs/convert/parquet",
                                                         "data/*.parquet")
    assert hub.where == (("language", "Korean"),) and hub.tokens == 2_500_000 and hub.spec.startswith("hf://")
    local = parse_source("corpus/*.jsonl?tokens=10k", base=tmp_path)
    assert local.spec == f"{tmp_path}/corpus/*.jsonl?tokens=10k" and local.location == f"{tmp_path}/corpus/*.jsonl"
    assert local.repo_id is None and local.tokens == 10_000
    assert parse_source("a.jsonl").spec == str(Path.cwd() / "a.jsonl")


@pytest.mark.parametrize("spec, message", [
    ("hf://models/a/b/*.parquet", "only Hub datasets can be data"),
    ("hf://datasets/a/b", "expected hf://datasets/OWNER/NAME[@REVISION]/GLOB"),
    ("a.jsonl?tokens=0", "tokens=0; expected a positive count"),
    ("a.jsonl?tokens=lots", "tokens=lots; expected a positive count"),
    ("a.jsonl?language", "bad option 'language'; expected COLUMN=VALUE or tokens=N"),
    ("a.jsonl?lang=ko&lang=en", "option 'lang' is given twice"),
])
def test_malformed_sources(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_source(spec)


# ---- local files ----

def test_directory_and_glob_sources(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    write_jsonl(corpus / "b.jsonl", EN[:2])
    (corpus / "a.txt").write_text(f"{EN[2]}\n\n{EN[3]}\n", encoding="utf-8")
    (corpus / "sub" / "c.parquet").write_bytes(text_rows(KO[:2]))
    (corpus / "README.md").write_text("not data")
    in_order = EN[2:4] + EN[:2] + KO[:2]  # a.txt, b.jsonl, sub/c.parquet: sorted paths
    assert list(read_documents(corpus)) == in_order
    assert list(read_documents(f"{corpus}/*.jsonl")) == EN[:2]
    assert list(read_documents(f"{corpus}/**/*.parquet")) == KO[:2]
    tokens, _, _ = tokenize_files([corpus], ByteTokenizer(), tmp_path / "cache")
    assert tokens.tolist() == expected_tokens(in_order)
    tokens, _, _ = tokenize_files([f"{corpus}/*?tokens=1"], ByteTokenizer(), tmp_path / "cache")
    assert tokens.tolist() == expected_tokens(in_order[:1])  # a limit ends at the first document that reaches it


def test_local_parquet_needs_pyarrow(tmp_path, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(text_rows(KO[:2]))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(ValueError, match=r'reading Parquet needs pyarrow; install it with pip install -e "\.\[hub\]"'):
        parse_source(tmp_path / "a.parquet").list_shards()


# ---- Hub datasets ----

def test_hub_parquet_equals_the_same_rows_as_local_jsonl(hub, tmp_path):
    hub.publish("wikimedia/wikipedia", {"20231101.ko/train-00000-of-00002.parquet": text_rows(KO[:10]),
                                        "20231101.ko/train-00001-of-00002.parquet": text_rows(KO[10:]),
                                        "20231101.en/train-00000-of-00001.parquet": text_rows(EN)})
    en = write_jsonl(tmp_path / "en.jsonl", EN)
    from_hub = build_dataset({"ko": ["hf://datasets/wikimedia/wikipedia/20231101.ko/*.parquet"], "en": [en]},
                             ByteTokenizer(), 16, None, seed=0, cache_dir=tmp_path / "hub-cache")
    local = build_dataset({"ko": [write_jsonl(tmp_path / "ko.jsonl", KO)], "en": [en]}, ByteTokenizer(), 16, None,
                          seed=0, cache_dir=tmp_path / "local-cache")
    (hub_sampler, hub_info), (local_sampler, local_info) = from_hub, local
    assert hub_info["ko"].cache_path != local_info["ko"].cache_path
    assert Path(hub_info["ko"].cache_path).read_bytes() == Path(local_info["ko"].cache_path).read_bytes()
    for _ in range(5):
        a, b = hub_sampler.next_batch(4), local_sampler.next_batch(4)
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and a.langs == b.langs
    assert [torch.equal(a.inputs, b.inputs) for a, b in zip(hub_sampler.val_batches("ko", 4),
                                                            local_sampler.val_batches("ko", 4))] == [True]


def test_a_new_revision_is_tokenized_again(hub, tmp_path):
    first = hub.publish("o/corpus", {"data/train.parquet": text_rows(KO)})
    _, old_cache, _ = tokenize_files(["hf://datasets/o/corpus/data/*.parquet"], ByteTokenizer(), tmp_path / "cache")
    second = hub.publish("o/corpus", {"data/train.parquet": text_rows(EN)})  # refs/main moves on
    tokenizer = ByteTokenizer()
    tokens, cache, seconds = tokenize_files(["hf://datasets/o/corpus/data/*.parquet"], tokenizer, tmp_path / "cache")
    assert cache != old_cache and seconds is not None and tokens.tolist() == expected_tokens(EN)
    pinned = ByteTokenizer()
    tokens, cache, seconds = tokenize_files([f"hf://datasets/o/corpus@{first}/data/*.parquet"], pinned,
                                            tmp_path / "cache")
    assert cache == old_cache and seconds is None and pinned.calls == 0 and tokens.tolist() == expected_tokens(KO)
    assert sources.source_digests(["hf://datasets/o/corpus/data/*.parquet"]) == {
        "hf://datasets/o/corpus/data/*.parquet": second}


def test_a_token_budget_fetches_only_the_shards_it_needs(hub, tmp_path, fetched):
    shards = [KO[:8], KO[8:16], KO[16:]]
    hub.publish("o/big", {f"train-{i:05d}.parquet": text_rows(texts) for i, texts in enumerate(shards)})
    first_shard = len(expected_tokens(shards[0]))
    spec = f"hf://datasets/o/big/*.parquet?tokens={first_shard - 20}"
    tokens, _, _ = tokenize_files([spec], ByteTokenizer(), tmp_path / "cache")
    assert fetched == ["train-00000.parquet"]
    stream = expected_tokens(KO)
    ends = np.flatnonzero(np.array(stream) == 0) + 1
    assert tokens.tolist() == stream[:ends[np.searchsorted(ends, first_shard - 20)]]
    tokenize_files([spec], ByteTokenizer(), tmp_path / "cache")
    assert fetched == ["train-00000.parquet"]  # a cache hit: the key needs no shard's contents

    tokens, _, _ = tokenize_files([f"hf://datasets/o/big/*.parquet?tokens={first_shard + 1}"], ByteTokenizer(),
                                  tmp_path / "cache")
    assert fetched[1:] == ["train-00000.parquet", "train-00001.parquet"]
    assert tokens.tolist() == expected_tokens(shards[0] + shards[1][:1])


def test_online_a_dataset_is_pinned_to_its_commit_and_fetched_shard_by_shard(tmp_path, monkeypatch):
    """The calls a Hub dataset makes online (HfApi and hf_hub_download, faked here): one commit for the listing and
    every download, and no download before a reader reaches the shard."""
    commit = "c" * 40
    files = {"ko/train-0.parquet": text_rows(KO[:12]), "ko/train-1.parquet": text_rows(KO[12:]),
             "en/train-0.parquet": text_rows(EN), "README.md": b"# a dataset card"}

    class Api:
        def dataset_info(self, repo_id, revision=None):
            assert (repo_id, revision) == ("o/wiki", "v2")
            return SimpleNamespace(sha=commit)

        def list_repo_files(self, repo_id, repo_type, revision):
            assert (repo_id, repo_type, revision) == ("o/wiki", "dataset", commit)
            return list(files)

    downloads = []

    def download(repo_id, filename, repo_type, revision):
        downloads.append((filename, revision))
        path = tmp_path / "downloads" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[filename])
        return str(path)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sources, "HfApi", Api)
    monkeypatch.setattr(sources, "hf_hub_download", download)
    listing = parse_source("hf://datasets/o/wiki@v2/ko/*").list_shards()
    assert listing.commit == commit and downloads == []
    assert [s.name for s in listing.shards] == [f"hf://datasets/o/wiki@{commit}/ko/train-{i}.parquet" for i in (0, 1)]
    documents = read_documents("hf://datasets/o/wiki@v2/ko/*")
    assert [next(documents) for _ in range(12)] == KO[:12] and downloads == [("ko/train-0.parquet", commit)]
    assert list(documents) == KO[12:] and downloads[1:] == [("ko/train-1.parquet", commit)]


# ---- errors: one line naming the source, before any model loads ----

def missing_shard(hub, tmp_path):
    commit = hub.publish("o/gappy", {"a.parquet": text_rows(KO[:4]), "b.parquet": text_rows(KO[4:8])})
    (hub.root / "datasets--o--gappy" / "snapshots" / commit / "b.parquet").resolve().unlink()
    return "hf://datasets/o/gappy/*.parquet", FileNotFoundError, (
        f"hf://datasets/o/gappy@{commit}/b.parquet: shard missing")


def missing_column(hub, tmp_path):
    commit = hub.publish("o/bodies", {"a.parquet": parquet_bytes(body=KO[:4])})
    return "hf://datasets/o/bodies/*.parquet", ValueError, (
        f"hf://datasets/o/bodies@{commit}/a.parquet: no column 'text'")


def bad_utf8(hub, tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(KO[0], encoding="utf-8")
    (tmp_path / "texts" / "b.txt").write_bytes(b"fine\n\n\xc3(\n")
    return str(tmp_path / "texts"), ValueError, f"{tmp_path}/texts/b.txt:3: not valid UTF-8"


def empty_dataset(hub, tmp_path):
    hub.publish("o/empty", {"a.parquet": parquet_bytes(text=pa.array([], pa.string()))})
    return "hf://datasets/o/empty/*.parquet", ValueError, "hf://datasets/o/empty/*.parquet: no documents"


def unknown_dataset(hub, tmp_path):
    return "hf://datasets/nobody/nothing/*.parquet", FileNotFoundError, (
        "hf://datasets/nobody/nothing/*.parquet: not in the local Hugging Face cache")


def no_matching_shard(hub, tmp_path):
    commit = hub.publish("o/json", {"a.jsonl": b'{"text": "x"}\n'})
    return "hf://datasets/o/json/*.parquet", FileNotFoundError, (
        f"hf://datasets/o/json/*.parquet: no .jsonl, .txt or .parquet files match '*.parquet' at commit {commit}")


@pytest.mark.parametrize("case", [missing_shard, missing_column, bad_utf8, empty_dataset, unknown_dataset,
                                  no_matching_shard])
def test_bad_sources_are_one_line_errors_naming_them(hub, tmp_path, case):
    spec, error, message = case(hub, tmp_path)
    with pytest.raises(error) as raised:
        build_dataset({"ko": [spec]}, ByteTokenizer(), 4, {"ko": 1}, 0, cache_dir=tmp_path / "cache")
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


@pytest.mark.parametrize("stage, data", [("pretrain", "ko=hf://datasets/nobody/nothing/*.parquet"),
                                         ("sft", "ko=hf://datasets/nobody/nothing/*.parquet?language=Korean")])
def test_an_unreachable_dataset_fails_before_the_model_is_read(hub, tmp_path, capsys, stage, data):
    from elo import pretrain, sft
    from elo.tools.cli import run_main

    main = {"pretrain": pretrain.main, "sft": sft.main}[stage]
    with pytest.raises(SystemExit) as exit_info:  # the model does not exist: reading it would be another error
        run_main(main, ["--model", str(tmp_path / "no-model"), "--data", data, "--max-steps", "1",
                        "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == (f"error: --data ko: {data[3:]}: not in the local Hugging Face cache "
                                                 f"({hub.root}) and HF_HUB_OFFLINE is set; fetch it once online\n")


# ---- chat data ----

def tagengo_rows() -> bytes:
    """Tagengo's layout: ShareGPT conversations plus a language column."""
    rows = [("Korean", "안녕하세요?", "네, 안녕하세요."), ("English", "Hello?", "Hi there."),
            ("Korean", "날씨 어때요?", "맑아요."), ("Japanese", "こんにちは", "どうも"),
            ("Korean", "고마워요", "천만에요."), ("English", "Thanks!", "You're welcome.")]
    return parquet_bytes(conversation_id=[str(i) for i in range(len(rows))], language=[r[0] for r in rows],
                         conversations=[[{"from": "human", "value": q}, {"from": "gpt", "value": a}]
                                        for _, q, a in rows])


def test_chat_data_from_a_hub_parquet_filtered_by_language(hub, tmp_path, default_model_dir):
    commit = hub.publish("lightblue/tagengo-gpt4", {"output.parquet": tagengo_rows()})
    tagengo = "hf://datasets/lightblue/tagengo-gpt4/*.parquet"
    korean = read_chat_source(f"{tagengo}?language=Korean")
    assert [where for where, _ in korean] == [f"hf://datasets/lightblue/tagengo-gpt4@{commit}/output.parquet:{row}"
                                              for row in (1, 3, 5)]
    assert korean[1][1] == [{"role": "user", "content": "날씨 어때요?"},
                            {"role": "assistant", "content": "맑아요."}]

    local = tmp_path / "ko.jsonl"
    local.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for _, m in korean))
    tokenizer = load_tokenizer(default_model_dir)
    from_hub, info = build_chat_source({"ko": [f"{tagengo}?language=Korean"], "en": [f"{tagengo}?language=English"]},
                                       tokenizer, 256, None, 0, val_conversations=1)
    from_jsonl, _ = build_chat_source({"ko": [local], "en": [f"{tagengo}?language=English"]}, tokenizer, 256, None, 0,
                                      val_conversations=1)
    assert (info["ko"].whole, info["en"].whole) == (3, 2)
    assert np.array_equal(from_hub.train["ko"].ids, from_jsonl.train["ko"].ids)
    with pytest.raises(ValueError, match=r"tagengo-gpt4/\*\.parquet\?language=Thai: no conversations pass its filters"):
        read_chat_source(f"{tagengo}?language=Thai")
    with pytest.raises(ValueError, match=r"\?language=Korean&tokens=1000: \?tokens= limits pretraining text"):
        read_chat_source(f"{tagengo}?language=Korean&tokens=1000")
