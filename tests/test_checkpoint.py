"""Checkpoint I/O: lazy reads, HF-compatible atomic writes, byte-exact round trips."""
import json
from pathlib import Path

import pytest
import torch

import elo
from elo.hf.checkpoint import CheckpointReader, load_config
from elo.tools.files import MARKER


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

    monkeypatch.setattr("elo.hf.checkpoint.write_config", crash)
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


# ---- outputs never overwrite what elo did not write (issue 9, bad results 1 and 2) ----

def test_save_refuses_a_directory_holding_other_files(tiny_llama, tmp_path):
    model = elo.load_model(tiny_llama[0])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a week of notes")
    with pytest.raises(ValueError, match=r"non-empty directory that elo did not write") as e:
        elo.save_model(model, mine)
    assert "\n" not in str(e.value)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "a week of notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp or backup left beside it


def test_save_refuses_a_file_destination_without_moving_it(tiny_llama, tmp_path):
    model = elo.load_model(tiny_llama[0])
    f = tmp_path / "model.bin"
    f.write_bytes(b"user data")
    with pytest.raises(ValueError, match=r"model.bin is a file, not a directory"):
        elo.save_model(model, f)
    assert f.read_bytes() == b"user data" and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_an_elo_written_directory_is_replaced(tiny_llama, tmp_path):
    model = elo.load_model(tiny_llama[0])
    out = elo.save_model(model, tmp_path / "out")
    assert (out / MARKER).is_file()
    with torch.no_grad():
        model.model.norm.weight.add_(1)
    elo.save_model(model, out)
    assert torch.equal(elo.load_model(out).model.norm.weight, model.model.norm.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- errors name the file ----

def test_truncated_safetensors_is_named(tiny_llama, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama[0], broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{shard.name}: not a readable safetensors file .*truncated or corrupt"):
        elo.load_model(broken)
    single = tmp_path / "single"
    elo.save_model(elo.load_model(tiny_llama[0]), single)
    (single / "model.safetensors").write_bytes(b"\x08\x00")
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        elo.load_model(single)


def test_broken_config_is_named(tiny_llama, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama[0], broken)
    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "vocab_')
    with pytest.raises(ValueError, match=r"broken/config.json: not a valid JSON config"):
        elo.load_model(broken)
    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ValueError, match=r"broken/config.json: config.json for LlamaForCausalLM is missing"):
        elo.load_model(broken)


def test_unreachable_hub_id_is_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"'nobody-elo/no-such-model' is not a local directory and the "
                                                r"Hugging Face hub could not provide it") as e:
        elo.load_model("nobody-elo/no-such-model")
    assert "\n" not in str(e.value)
