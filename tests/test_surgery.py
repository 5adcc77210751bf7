"""detach / splice, in memory and checkpoint to checkpoint."""
import json

import pytest
import torch

import elo
from elo.hf.checkpoint import CheckpointReader
from elo.tools.files import MARKER
from tests.test_checkpoint import tensors


def manual_pass(model, ids, layer_numbers):
    """embed -> the chosen layers (1-based) -> norm -> head, written out by hand."""
    x = model.model.embed_tokens(ids)
    cos, sin = model.rope(torch.arange(ids.shape[1])[None], x.dtype)
    for n in layer_numbers:
        layer = model.model.layers[str(n - 1)]
        window = model.config.window(n - 1)
        mask = elo.model.attention_mask([0], ids.shape[1], window, x.device)
        x = layer(x, cos, sin, mask)
    return model.lm_head(model.model.norm(x))


def test_detach_equals_manual_pass(tiny):
    arch, directory, _ = tiny
    model = elo.load_model(directory)
    sub = elo.detach(model, [1, 4])
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(sub(ids), manual_pass(model, ids, [1, 4]), atol=1e-6, rtol=0)
    assert sub.config.num_hidden_layers == 2 and sub.config.layer_ids == [0, 3]
    assert sub.config.elo["layers"] == [1, 4] and sub.config.elo["base_num_hidden_layers"] == 4
    full = model.state_dict()
    assert set(sub.state_dict()) < set(full)  # an exact subset, same names
    assert all(torch.equal(t, full[n]) for n, t in sub.state_dict().items())
    assert sub.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()  # a copy, not a view
    assert (sub.lm_head.weight is sub.model.embed_tokens.weight) == (arch == "qwen2")  # ties kept


@pytest.mark.parametrize("layers", [[1, 2, 4], [1, 3, 4], [2, 3]])
def test_detach_of_wider_ends_equals_manual_pass(tiny, layers):
    """Ends of several layers (as 1,2,29,30 on a 30-layer model) run in order, each with its own layer type."""
    _, directory, _ = tiny
    model = elo.load_model(directory)
    sub = elo.detach(model, layers)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(sub(ids), manual_pass(model, ids, layers), atol=1e-6, rtol=0)
    assert sub.config.layer_ids == [n - 1 for n in layers]


def test_negative_layers_mean_from_the_end(tiny_llama):
    model = elo.load_model(tiny_llama[0])
    assert elo.detach(model, [1, -1]).config.layer_ids == [0, 3]
    assert elo.detach(model, "2,3").config.layer_ids == [1, 2]


@pytest.mark.parametrize("layers, message", [
    ([0, 4], "layer 0 is out of range: layers are numbered 1..4"),
    ([1, 5], "layer 5 is out of range"),
    ([1, -5], "layer -5 is out of range"),
    ([1, 1], "name the same layer twice"),
    ([4, -1], "name the same layer twice"),
    ([], "no layers given"),
    ("1,x", "comma-separated integers"),
    ([1.0, 4.0], r"layers \[1.0, 4.0\]: expected a list of 1-based layer numbers \(ints\)"),
    (1, r"layers 1: expected a list of 1-based layer numbers"),
])
def test_bad_layers(tiny_llama, layers, message):
    with pytest.raises(ValueError, match=message):
        elo.detach(elo.load_model(tiny_llama[0]), layers)


def test_splice_roundtrip_and_changes_only_those_layers(tiny):
    arch, directory, _ = tiny
    model = elo.load_model(directory)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    elo.splice(model, elo.detach(model, [1, 4]))
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())

    sub = elo.detach(model, [1, 4])
    with torch.no_grad():
        for name, p in sub.named_parameters():
            if ".layers." in name:
                p.add_(1.0)
    elo.splice(model, sub)
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    expected = {n for n in before if n.startswith(("model.layers.0.", "model.layers.3."))}
    assert changed == expected


def test_splice_refuses_other_bases(tiny_llama, tmp_path):
    from tests.conftest import build_hf_checkpoint

    model = elo.load_model(tiny_llama[0])
    sub = elo.detach(model, [1, 4])
    build_hf_checkpoint("llama", tmp_path / "other", seed=7)
    other = elo.load_model(tmp_path / "other")
    with pytest.raises(ValueError, match="different model"):
        elo.splice(other, sub)
    build_hf_checkpoint("mistral", tmp_path / "mistral", seed=0)
    mistral = elo.load_model(tmp_path / "mistral")
    with pytest.raises(ValueError, match="detached from a 4-layer"):
        elo.splice(mistral, sub)
    with pytest.raises(ValueError, match="not an ELO submodel"):
        elo.splice(model, model)
    with pytest.raises(ValueError, match="already an ELO submodel"):
        elo.detach(sub, [1])


def test_checkpoint_roundtrip_is_bit_exact(tiny, tmp_path):
    import transformers

    arch, directory, _ = tiny
    sub_dir = elo.detach_checkpoint(directory, [1, 4], tmp_path / "sub")
    # the submodel on disk is a valid 2-layer HF model whose config records where it came from
    cfg = json.loads((sub_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["elo"]["layers"] == [1, 4]
    transformers.AutoModelForCausalLM.from_pretrained(sub_dir)
    # and elo loads it with the original layer numbers, equal to an in-memory detach
    sub = elo.load_model(sub_dir)
    mem = elo.detach(elo.load_model(directory), [1, 4])
    assert sub.state_dict().keys() == mem.state_dict().keys()
    assert all(torch.equal(t, mem.state_dict()[n]) for n, t in sub.state_dict().items())
    out = elo.splice_checkpoint(directory, sub_dir, tmp_path / "spliced")
    assert tensors(out) == tensors(directory)
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == sorted(p.name for p in directory.iterdir())


def test_splice_checkpoint_writes_trained_layers(tiny_llama, tmp_path):
    directory, _ = tiny_llama
    model = elo.load_model(directory)
    sub = elo.detach(model, [2, 3])
    with torch.no_grad():
        sub.model.layers["2"].mlp.up_proj.weight.mul_(2)
    sub_dir = elo.save_model(sub, tmp_path / "sub")
    out = elo.splice_checkpoint(directory, sub_dir, tmp_path / "spliced")
    elo.splice(model, sub)
    spliced = elo.load_model(out)
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in spliced.state_dict().items())
    assert not torch.equal(spliced.model.layers["2"].mlp.up_proj.weight, elo.load_model(directory).model.layers["2"].mlp.up_proj.weight)


def test_detach_checkpoint_reads_only_what_it_needs(tiny_llama, tmp_path, monkeypatch):
    directory, _ = tiny_llama
    read = []
    original = CheckpointReader.get

    def counting_get(self, name):
        read.append(name)
        return original(self, name)

    monkeypatch.setattr(CheckpointReader, "get", counting_get)
    elo.detach_checkpoint(directory, [1, 4], tmp_path / "sub")
    assert not any(n.startswith(("model.layers.1.", "model.layers.2.")) for n in read)
    assert {n for n in read if n.startswith("model.layers.")} == {
        n for n in CheckpointReader(directory).keys() if n.startswith(("model.layers.0.", "model.layers.3."))}


def test_splice_checkpoint_refuses_other_base(tiny_llama, tmp_path):
    from tests.conftest import build_hf_checkpoint

    sub_dir = elo.detach_checkpoint(tiny_llama[0], [1, 4], tmp_path / "sub")
    build_hf_checkpoint("llama", tmp_path / "other", seed=3)
    with pytest.raises(ValueError, match="different model"):
        elo.splice_checkpoint(tmp_path / "other", sub_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_detached_equals_detach(tiny):
    arch, directory, _ = tiny
    sub = elo.load_detached(directory, "1,-1")
    mem = elo.detach(elo.load_model(directory), [1, 4])
    assert sub.config == mem.config
    assert all(torch.equal(t, mem.state_dict()[n]) for n, t in sub.state_dict().items())


def test_splice_in_place_keeps_side_files(tiny_llama, tmp_path):
    """Splicing into the base itself replaces the trained tensors and keeps every other file of the base."""
    model = elo.load_model(tiny_llama[0])
    base = elo.save_model(model, tmp_path / "base", max_shard_bytes=60_000)
    (base / "README.md").write_text("# my model card")
    (base / "extra").mkdir()
    (base / "extra" / "notes.txt").write_text("notes")
    sub = elo.detach(model, [2, 3])
    with torch.no_grad():
        sub.model.layers["1"].self_attn.q_proj.weight.mul_(3)
    sub_dir = elo.save_model(sub, tmp_path / "sub")
    files_before = sorted(str(p.relative_to(base)) for p in base.rglob("*"))
    assert elo.splice_checkpoint(base, sub_dir, base) == base
    assert (base / "README.md").read_text() == "# my model card" and (base / "extra" / "notes.txt").read_text() == "notes"
    assert sorted(str(p.relative_to(base)) for p in base.rglob("*")) == files_before
    elo.splice(model, sub)
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in elo.load_model(base).state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "sub"]


def test_checkpoint_writers_refuse_foreign_directories(tiny_llama, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("keep")
    sub_dir = elo.detach_checkpoint(tiny_llama[0], [1, 4], tmp_path / "sub")
    with pytest.raises(ValueError, match="non-empty directory that elo did not write"):
        elo.detach_checkpoint(tiny_llama[0], [1, 4], mine)
    with pytest.raises(ValueError, match="non-empty directory that elo did not write"):
        elo.splice_checkpoint(tiny_llama[0], sub_dir, mine)
    assert [p.name for p in mine.iterdir()] == ["keep.txt"] and (mine / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "sub"]
