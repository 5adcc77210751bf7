"""Checkpoint I/O: lazy reads, HF-compatible atomic writes, byte-exact round trips."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import elo
from elo.checkpoint import CheckpointReader, load_config


def tensors(directory: Path) -> dict[str, bytes]:
    reader = CheckpointReader(directory)
    return {n: reader.get(n).contiguous().view(torch.uint8).numpy().tobytes() for n in reader.keys()}


def test_save_load_keeps_every_byte_and_loads_in_transformers(tiny, tmp_path):
    import transformers

    arch, directory, hf = tiny
    model = elo.load_model(directory)
    out = elo.save_model(model, tmp_path / "out", max_shard_bytes=60_000)
    assert (out / "model.safetensors.index.json").is_file()  # sharded like the source
    assert tensors(out) == tensors(directory)
    assert not list(tmp_path.glob(".out.tmp-*"))
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)
    assert load_config(out) == model.config


def test_single_file_and_tokenizer_files_copied(tiny_llama, tmp_path):
    directory, _ = tiny_llama
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    out = elo.save_model(elo.load_model(directory), tmp_path / "single")
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_save_is_atomic(tiny_llama, tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint in place and no directory that looks like a model."""
    directory, _ = tiny_llama
    model = elo.load_model(directory)
    out = elo.save_model(model, tmp_path / "ckpt")
    before = tensors(out)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("elo.checkpoint.write_config", crash)
    with torch.no_grad():
        model.model.norm.weight.add_(1)
    with pytest.raises(OSError, match="disk full"):
        elo.save_model(model, out)
    assert tensors(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_reader_reads_only_what_is_asked(tiny_llama):
    directory, _ = tiny_llama
    reader = CheckpointReader(directory)
    t = reader.get("model.layers.2.mlp.up_proj.weight")
    assert reader.bytes_read == t.numel() * 4 == 128 * 64 * 4
    rows = reader.get_rows("model.embed_tokens.weight", 4)
    assert rows.shape == (4, 64) and reader.bytes_read == (128 * 64 + 4 * 64) * 4


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local directory"):
        elo.load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        elo.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        CheckpointReader(tmp_path)


def test_missing_tensor_is_named(tiny_llama, tmp_path):
    import shutil

    directory, _ = tiny_llama
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.3.mlp.down_proj.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lacks 1 tensor.*model.layers.3.mlp.down_proj.weight"):
        elo.load_model(broken)
