"""The middle-layer surrogate (elo.extensions.middle): the streamed ridge fit against an exactly linear middle and a one-shot
lstsq, its file beside a submodel's HF files, and on the default model a closer match to the full model."""
from __future__ import annotations

import itertools

import pytest
import torch

import elo
from elo.data.text import Batch
from elo.extensions.hidden import layer_states
from elo.hf.checkpoint import MIDDLE_NAME
from tests.conftest import SAMPLE


class Affine(torch.nn.Module):
    """A decoder layer replaced by x ↦ x A + c: exactly linear."""

    def __init__(self, d: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.eye(d) + 0.2 * torch.randn(d, d, generator=g)
        self.c = torch.randn(d, generator=g)

    def forward(self, x, *args):
        return x @ self.a + self.c


def random_batches(vocab: int, n: int, shape=(4, 32), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, shape, generator=g) for _ in range(n)]


def six_layers(directory) -> elo.Transformer:
    config = elo.load_model(directory).config
    config = config.replace(num_hidden_layers=6, layer_ids=list(range(6)), layer_types=["full_attention"] * 6)
    torch.manual_seed(0)
    return elo.Transformer(config)


def test_fit_recovers_an_exactly_linear_middle(tiny_llama):
    """Layers 2 (gap 1 -> 3) and 4, 5 (gap 3 -> 6) are affine maps: the fit finds them exactly, R² = 1."""
    model = six_layers(tiny_llama[0])
    d = model.config.hidden_size
    maps = {i: Affine(d, i) for i in (1, 3, 4)}
    for i, m in maps.items():
        model.model.layers[str(i)] = m
    surrogate = elo.fit_middle(model, [1, 3, 6], random_batches(256, 6), tokens=600, ridge=0)
    assert list(surrogate) == ["2", "5"] and surrogate.stats["gaps"] == [[1, 3], [3, 6]]
    expected = {"2": (maps[1].a, maps[1].c), "5": (maps[3].a @ maps[4].a, maps[3].c @ maps[4].a + maps[4].c)}
    for key, (a, c) in expected.items():
        torch.testing.assert_close(surrogate[key].weight, a.T, rtol=0, atol=1e-4)
        torch.testing.assert_close(surrogate[key].bias, c, rtol=0, atol=1e-4)
    assert surrogate.stats["r2"] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert surrogate.stats["held_out"] == 60


def test_hidden_states_stop_below_the_upper_layer(tiny_llama):
    """Fitting layers (1, 4) reads the output of layer 3 and never runs layer 4 or the head."""

    class Unreachable(torch.nn.Module):
        def forward(self, *args):
            raise AssertionError("ran a layer above the ones needed")

    model = elo.load_model(tiny_llama[0])
    model.model.layers["3"] = Unreachable()
    model.lm_head.forward = Unreachable().forward
    states = layer_states(model, random_batches(256, 1)[0], {"2", "0"})
    assert sorted(states) == ["0", "2"] and states["2"][1].shape == (4, 32, model.config.hidden_size)
    elo.fit_middle(model, [1, 4], random_batches(256, 2), tokens=100)


def test_streamed_fit_equals_one_shot_lstsq(tiny_llama):
    """Moments accumulated over 5 batches (elo.data.text.Batch, as a sampler gives them) solve to what torch.linalg.lstsq
    gets on all rows at once, with the ridge as extra rows sqrt(λ) I (bias unpenalised); R² on the held-out rows."""
    model = elo.load_model(tiny_llama[0])
    d, ridge, tokens, held_out = model.config.hidden_size, 0.05, 300, 50
    ids = random_batches(256, 5, (2, 40), seed=1)
    stream = (Batch(x, x, ["ko"] * len(x)) for x in itertools.cycle(ids))
    surrogate = elo.fit_middle(model, "1,3,4", stream, tokens=tokens, ridge=ridge, held_out=held_out)
    assert list(surrogate) == ["2"]  # layers 3 and 4 are adjacent: no map

    states = [layer_states(model, x, {"0", "1"}) for x in ids]
    x = torch.cat([s["0"][1].reshape(-1, d) for s in states]).double()
    y = torch.cat([s["1"][1].reshape(-1, d) for s in states]).double()
    xf, yf = x[:tokens], y[:tokens]
    lam = ridge * (xf - xf.mean(0)).pow(2).sum() / d
    design = torch.cat([torch.cat([xf, torch.ones(tokens, 1, dtype=torch.float64)], 1),
                        torch.cat([lam.sqrt() * torch.eye(d, dtype=torch.float64), torch.zeros(d, 1, dtype=torch.float64)], 1)])
    w = torch.linalg.lstsq(design, torch.cat([yf, torch.zeros(d, d, dtype=torch.float64)])).solution
    torch.testing.assert_close(surrogate["2"].weight, w[:d].T.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(surrogate["2"].bias, w[d].float(), rtol=1e-5, atol=1e-6)

    xh, yh = x[320:320 + held_out], y[320:320 + held_out]  # from the batch after the 4th, where fitting ends
    r2 = 1 - (yh - xh @ w[:d] - w[d]).pow(2).sum() / (yh - yh.mean(0)).pow(2).sum()
    assert surrogate.stats["r2"] == pytest.approx([r2.item()], abs=1e-9)
    assert 0 < r2 < 1  # layer 2 is not linear: the held-out fit is imperfect


def test_texts_and_batches_fit_alike(tiny_with_tokenizer):
    from elo.data.text import read_documents, text_windows

    model, tok = elo.load_model(tiny_with_tokenizer), elo.load_tokenizer(tiny_with_tokenizer)
    texts = [t[:400] for t in itertools.islice(read_documents(SAMPLE / "pretrain" / "ko_wikipedia.jsonl"), 3)]
    a = elo.fit_middle(model, [1, 4], texts, tokens=100, tokenizer=tok, seq_len=64)
    b = elo.fit_middle(model, [1, 4], text_windows(texts, tok, 64), tokens=100)
    assert torch.equal(a["3"].weight, b["3"].weight) and a.stats["r2"] == b.stats["r2"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=[2]), "at least 2 layers"),
    (dict(layers=[2, 3]), "adjacent"),
    (dict(kind="lowrank"), "unknown surrogate kind 'lowrank'; expected one of: linear"),
    (dict(tokens=64), "tokens=64 is too few to fit a map on hidden size 64; expected at least 65"),
    (dict(ridge=-1.0), "ridge=-1.0"),
    (dict(held_out=0), "held_out=0"),
    (dict(layers=[1, 9]), "layer 9 is out of range"),
    (dict(data=["some text"]), "pass tokenizer="),
    (dict(data=[torch.zeros(2, 8)]), "expected token id batches"),
    (dict(tokens=1000), "the data ran out after 256 tokens; fitting needs tokens + held_out = 1100"),
])
def test_bad_input_is_a_one_line_error(tiny_llama, kwargs, message):
    args = dict(model=tiny_llama[0], layers=[1, 4], data=random_batches(256, 2), tokens=100) | kwargs
    with pytest.raises(ValueError) as e:
        elo.fit_middle(**args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fit_refuses_a_submodel(tiny_llama):
    with pytest.raises(ValueError, match="needs the full base model"):
        elo.fit_middle(elo.load_detached(tiny_llama[0], [1, 4]), [1, 4], random_batches(256, 2), tokens=100)


def test_attach_checks_layers_and_base(tiny_llama, tmp_path):
    from tests.conftest import build_hf_checkpoint

    surrogate = elo.fit_middle(tiny_llama[0], [1, 4], random_batches(256, 2), tokens=100)
    with pytest.raises(ValueError, match=r"fitted for layers \[1, 4\]; the submodel holds \[1, 3\]"):
        elo.attach_middle(elo.load_detached(tiny_llama[0], [1, 3]), surrogate)
    with pytest.raises(ValueError, match="no 'elo' record"):
        elo.attach_middle(elo.load_model(tiny_llama[0]), surrogate)
    build_hf_checkpoint("llama", tmp_path, seed=1)
    with pytest.raises(ValueError, match="another base model"):
        elo.attach_middle(elo.load_detached(tmp_path, [1, 4]), surrogate)


def test_surrogate_file_round_trip_and_transformers_ignores_it(tiny_llama, tmp_path):
    """save_middle / load_middle are bit-exact; a saved submodel keeps HF names and files only (transformers loads it
    and gets the plain submodel), and elo's load_model attaches the surrogate again."""
    import transformers

    directory, _ = tiny_llama
    surrogate = elo.fit_middle(directory, [1, 4], random_batches(256, 2), tokens=100)
    elo.save_middle(surrogate, tmp_path / "alone")
    loaded = elo.load_middle(tmp_path / "alone")
    assert loaded.stats == surrogate.stats and list(loaded) == list(surrogate)
    for key in surrogate:
        assert torch.equal(loaded[key].weight, surrogate[key].weight) and torch.equal(loaded[key].bias, surrogate[key].bias)

    sub = elo.load_detached(directory, [1, 4])
    plain = sub.state_dict()
    elo.attach_middle(sub, surrogate)
    assert sub.state_dict().keys() == plain.keys()  # the surrogate adds no HF weight names
    assert not any(p is surrogate["3"].weight for p in sub.parameters())
    elo.save_model(sub, tmp_path / "sub")
    assert (tmp_path / "sub" / MIDDLE_NAME).is_file()

    ids = random_batches(256, 1, (2, 16), seed=5)[0]
    with torch.no_grad():
        with_middle = sub(ids)
        sub.middle = None
        without = sub(ids)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sub").eval()(ids).logits
        again = elo.load_model(tmp_path / "sub")
        assert again.middle is not None and again.middle.stats == surrogate.stats
        assert torch.equal(again(ids), with_middle)
    torch.testing.assert_close(hf, without, rtol=1e-4, atol=1e-4)
    assert (with_middle - without).abs().max() > 0.1  # the surrogate is used, and transformers does not use it


def test_flops_count_the_surrogate(tiny_llama):
    from elo.train.flops import train_flops_per_token

    sub = elo.load_detached(tiny_llama[0], [1, 4])
    sub.requires_grad_(False)
    sub.model.layers.requires_grad_(True)
    before = train_flops_per_token(sub, 24)
    elo.attach_middle(sub, elo.fit_middle(tiny_llama[0], [1, 4], random_batches(256, 2), tokens=100))
    d = sub.config.hidden_size
    assert train_flops_per_token(sub, 24) - before == 4 * d * d  # forward + input gradient (layer 1 trains)


@pytest.mark.slow
def test_default_model_surrogate_is_closer_to_the_full_model():
    """SmolLM2-135M, layers (1, 30), fitted on 2.5k tokens of Korean Wikipedia: on later Korean text the submodel with
    the surrogate has a lower KL(full || submodel) of the next-token distribution than the plain submodel."""
    from elo.data.text import read_documents, text_windows

    full, tok = elo.load_model(elo.DEFAULT_MODEL), elo.load_tokenizer(elo.DEFAULT_MODEL)
    docs = read_documents(SAMPLE / "pretrain" / "ko_wikipedia.jsonl")
    fit_texts = [t[:2000] for t in itertools.islice(docs, 6)]
    eval_ids = next(text_windows([t[:2000] for t in itertools.islice(docs, 2)], tok, 256))
    surrogate = elo.fit_middle(full, [1, 30], fit_texts, tokens=2500, tokenizer=tok, seq_len=256)
    sub = elo.detach(full, [1, 30])
    with torch.no_grad():
        p = full(eval_ids).log_softmax(-1)
        kl = lambda model: (p.exp() * (p - model(eval_ids).log_softmax(-1))).sum(-1).mean().item()
        plain = kl(sub)
        closer = kl(elo.attach_middle(sub, surrogate))
    print(f"KL(full || submodel) plain {plain:.4f}, with surrogate {closer:.4f}; held-out R² {surrogate.stats['r2']}")
    assert closer < plain

