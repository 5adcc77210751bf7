"""The decoder against transformers: logits, KV cache, dtypes, config parsing."""
import dataclasses
import json

import pytest
import torch

import elo
from elo.config import ModelConfig
from tests.conftest import DATA, SAMPLE

TOL = 1e-4  # fp32 CPU, max abs logit difference vs transformers


def test_logits_match_transformers(tiny):
    arch, directory, hf = tiny
    model = elo.load_model(directory)
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ours = hf(ids).logits, model(ids)
    assert ours.shape == (3, 40, 256)
    assert (ours - ref).abs().max().item() <= TOL


def test_parity_tests_are_sensitive(tiny):
    """The features the fixtures exercise change the logits, so the parity test above would catch their absence."""
    arch, directory, hf = tiny
    model = elo.load_model(directory)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    cfg = model.config
    if arch == "llama":
        altered = dataclasses.replace(cfg, rope_scaling=None)
    elif arch == "mistral":
        altered = dataclasses.replace(cfg, layer_types=["full_attention"] * cfg.num_hidden_layers)
    else:
        altered = dataclasses.replace(cfg, layer_types=["full_attention"] * cfg.num_hidden_layers)
    other = elo.Transformer.from_state_dict(altered, model.state_dict())
    with torch.no_grad():
        assert (other(ids) - hf(ids).logits).abs().max().item() > 100 * TOL


def test_kv_cache_matches_full_forward(tiny):
    arch, directory, _ = tiny
    model = elo.load_model(directory)
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 30)
        steps = [model(ids[:, :11], cache=cache)]  # prefill
        steps.append(model(ids[:, 11:14], cache=cache))  # a chunk after the prefill: explicit mask
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(14, 30)]  # one token at a time
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="KV cache holds 30"):
        model(ids[:, :1], cache=cache)


def test_packed_documents_equal_transformers_on_each_alone(tiny):
    """A row packing documents of 5, 20 and 13 tokens (longer than the Mistral / Qwen2 window of 8, so the sliding
    window applies within a document): each document's logits equal transformers' on that document alone."""
    arch, directory, hf = tiny
    model = elo.load_model(directory)
    documents = [5, 20, 13]
    ids = torch.randint(0, 256, (1, sum(documents)), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        packed = model(ids, documents=documents)[0].split(documents)
        for doc, got in zip(ids[0].split(documents), packed):
            assert (got - hf(doc[None]).logits[0]).abs().max().item() <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(tiny_llama, dtype):
    directory, _ = tiny_llama
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = elo.load_model(directory)(ids)
        half = elo.load_model(directory, dtype=dtype)
        assert half.lm_head.weight.dtype == dtype
        out = half(ids)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_half_precision_matches_transformers_bf16(tiny_llama):
    """In bf16 our ops follow HF's casting order (fp32 norms and RoPE tables), so the logits agree closely."""
    import transformers

    directory, _ = tiny_llama
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="sdpa")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (elo.load_model(directory, dtype=torch.bfloat16)(ids).float() - hf(ids).logits.float()).abs().max()
    assert diff.item() <= 0.05  # bf16 rounding of the logits (|logit| ~ 3) is ~0.016


def test_config_errors():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 2, "num_attention_heads": 2}
    assert ModelConfig.from_hf(base).head_dim == 4
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        ModelConfig.from_hf(base | {"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="missing required key.*intermediate_size"):
        ModelConfig.from_hf({k: v for k, v in base.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
        ModelConfig.from_hf(base | {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_config_roundtrip_both_rope_spellings(tiny):
    """A config we write is read back identically by us, and by transformers with the same RoPE."""
    import transformers

    arch, directory, hf = tiny
    cfg = ModelConfig.from_file(directory / "config.json")
    again = ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf())))
    assert again == cfg
    legacy = cfg.to_hf()
    legacy.pop("rope_parameters")  # transformers 4.x spelling: rope_theta + rope_scaling
    assert ModelConfig.from_hf(legacy) == cfg
    hf_again = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.to_hf().items() if k != "model_type"},
                                                 model_type=cfg.model_type)
    assert hf_again.rope_parameters == hf.config.rope_parameters
    if arch == "qwen2":  # the one config class with layer_types
        assert hf_again.layer_types == hf.config.layer_types


def real_texts(n: int = 2) -> dict[str, list[str]]:
    """The first `n` documents per language: Korean and English from the bundled sample, Japanese from ../shared/data
    when it is there (the sample has no Japanese)."""
    files = {"ko": SAMPLE / "pretrain" / "ko_wikipedia.jsonl", "ja": DATA / "pretrain" / "ja_aozora.jsonl",
             "en": SAMPLE / "pretrain" / "en_wikipedia.jsonl"}
    texts = {}
    for lang, path in files.items():
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                texts[lang] = [json.loads(next(f))["text"] for _ in range(n)]
    return texts


def test_default_model_logits_match_transformers(default_model_dir):
    """SmolLM2-135M-Instruct (30 layers, tied) on Korean, Japanese and English text, fp32 CPU."""
    import tokenizers
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()
    model = elo.load_model(default_model_dir)
    tok = tokenizers.Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    for lang, texts in real_texts().items():
        ids = torch.tensor([tok.encode(t).ids[:128] for t in texts])
        with torch.no_grad():
            diff = (model(ids) - hf(ids).logits).abs().max().item()
        assert diff <= TOL, (lang, diff)
