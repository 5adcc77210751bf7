"""elo.add_chat_vector on tiny random trios built here: every output tensor is model + r * (instruct - base) computed
in fp32 by the test, to within one unit in the last place of the output dtype; streamed; names and shapes checked."""
from __future__ import annotations

import json
import weakref

import pytest
import torch

import elo
from elo.hf.checkpoint import CheckpointReader
from tests.conftest import hf_config, perturb_


def save_tiny(arch: str, directory, seed: int, dtype=torch.float32, **changes):
    import transformers

    config = hf_config(arch)
    for k, v in changes.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    perturb_(model, seed)
    model.to(dtype).save_pretrained(directory, max_shard_size="100KB")
    return directory


def trio(tmp_path, arch: str, dtype=torch.float32, model_changes=None):
    dirs = [save_tiny(arch, tmp_path / role, seed, dtype, **((model_changes or {}) if role == "model" else {}))
            for seed, role in enumerate(("model", "base", "instruct"))]
    # a pretrained model has no chat template; the instruct model has one, and its own generation config
    (dirs[2] / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ instruct }}"}))
    gen = json.loads((dirs[2] / "generation_config.json").read_text()) | {"eos_token_id": [7, 9]}
    (dirs[2] / "generation_config.json").write_text(json.dumps(gen))
    return dirs


def tensors(directory) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(directory)
    return {n: reader.get(n) for n in reader.keys()}


def ulps(got: torch.Tensor, want_fp32: torch.Tensor) -> float:
    """Largest |got - want| in units of the last place of got's dtype at want's magnitude."""
    info = torch.finfo(got.dtype)
    scale = torch.exp2(torch.floor(torch.log2(want_fp32.abs().clamp_min(info.tiny))))
    return ((got.float() - want_fp32).abs() / (scale * info.eps)).max().item()


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("qwen2", torch.bfloat16)])
def test_every_tensor_is_model_plus_scaled_difference(tmp_path, arch, dtype):
    import transformers

    model, base, instruct = trio(tmp_path, arch, dtype)
    ratio = 0.7
    out = elo.add_chat_vector(model, base, instruct, tmp_path / "out", ratio=ratio)
    m, b, i, o = tensors(model), tensors(base), tensors(instruct), tensors(out)
    assert o.keys() == m.keys()
    assert ("lm_head.weight" in o) == (arch == "llama")  # Qwen2's tied head is the embedding, stored once
    for name, t in o.items():
        assert t.dtype == dtype and t.shape == m[name].shape, name
        want = m[name].float() + ratio * (i[name].float() - b[name].float())
        assert ulps(t, want) <= 1, name
        assert not torch.equal(t, m[name]), name  # the vector moved every tensor
    # config and shard layout of the model; tokenizer config (chat template) and generation config of the instruct
    assert (out / "config.json").read_bytes() == (model / "config.json").read_bytes()
    assert (out / "model.safetensors.index.json").is_file()
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (instruct / name).read_bytes()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(hf.model.norm.weight, o["model.norm.weight"])
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == (arch == "qwen2")


def test_vocabulary_mismatch_policies(tmp_path):
    model, base, instruct = trio(tmp_path, "llama", model_changes={"vocab_size": 300})  # an extended vocabulary
    m, b, i = tensors(model), tensors(base), tensors(instruct)
    added = tensors(elo.add_chat_vector(model, base, instruct, tmp_path / "add"))
    skipped = tensors(elo.add_chat_vector(model, base, instruct, tmp_path / "skip", embeddings="skip"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert added[name].shape == (300, 64)
        want = m[name][:256] + (i[name] - b[name])
        assert ulps(added[name][:256], want) <= 1, name
        assert torch.equal(added[name][256:], m[name][256:])  # rows only the model has are kept
        assert torch.equal(skipped[name], m[name])
    layer = "model.layers.0.mlp.up_proj.weight"
    for out in (added, skipped):
        assert ulps(out[layer], m[layer] + (i[layer] - b[layer])) <= 1
    with pytest.raises(ValueError, match="embeddings='keep'; expected one of"):
        elo.add_chat_vector(model, base, instruct, tmp_path / "bad", embeddings="keep")


def test_names_and_shapes_are_checked_naming_the_tensor(tmp_path):
    model, base, instruct = trio(tmp_path, "llama")
    qwen = save_tiny("qwen2", tmp_path / "qwen", 3, tie_word_embeddings=False)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.self_attn.k_proj.bias' is in base but not in "
                                         r"the model"):
        elo.add_chat_vector(model, qwen, instruct, tmp_path / "out")
    wide = save_tiny("llama", tmp_path / "wide", 4, intermediate_size=96)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' has shapes"):
        elo.add_chat_vector(model, base, wide, tmp_path / "out")
    other_width = save_tiny("llama", tmp_path / "narrow", 5, vocab_size=300, hidden_size=32, head_dim=8)
    with pytest.raises(ValueError, match=r"tensor 'lm_head.weight' has shapes"):  # rows may differ, columns not
        elo.add_chat_vector(model, base, other_width, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_at_most_one_tensor_per_source_in_memory(tmp_path, monkeypatch):
    model, base, instruct = trio(tmp_path, "llama")
    live: dict[str, int] = {}
    peak: dict[str, int] = {}
    get, get_rows = CheckpointReader.get, CheckpointReader.get_rows

    def track(reader, t):
        key = reader.directory.name
        live[key] = live.get(key, 0) + 1
        peak[key] = max(peak.get(key, 0), live[key])
        weakref.finalize(t, lambda: live.__setitem__(key, live[key] - 1))
        return t

    monkeypatch.setattr(CheckpointReader, "get", lambda self, name: track(self, get(self, name)))
    monkeypatch.setattr(CheckpointReader, "get_rows", lambda self, name, n: track(self, get_rows(self, name, n)))
    monkeypatch.setattr("elo.chat_vector.CHUNK", 1000)  # several chunks per tensor
    elo.add_chat_vector(model, base, instruct, tmp_path / "out", ratio=0.5)
    assert peak == {"model": 1, "base": 1, "instruct": 1}
    assert len(CheckpointReader(model).files()) > 1  # the trio is sharded, so "one output shard" is a real bound
