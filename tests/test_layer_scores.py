"""elo.extensions.layer_scores: block influence against transformers' hidden states, an identity layer scores 0, batch order does
not matter, the suggestion rule, and one-line errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import elo


def batches(lo: int, hi: int, seed: int, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(lo, hi, (2, 16), generator=g) for _ in range(n)]


# two "languages" that use different halves of the tiny vocabulary
DATA = {"ko": batches(0, 128, 0), "en": batches(128, 256, 1)}


def test_block_influence_matches_transformers_hidden_states(tiny_llama):
    directory, hf = tiny_llama
    scores = elo.layer_scores(elo.load_model(directory), DATA)
    ids = torch.cat(DATA["ko"])
    with torch.no_grad():
        hs = hf(ids, output_hidden_states=True).hidden_states  # the last one has the final norm applied: skip it
    expected = [1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean().item() for i in range(len(hs) - 2)]
    assert scores.influence["ko"][:-1] == pytest.approx(expected, abs=1e-5)
    assert scores.tokens == {"ko": 96, "en": 96} and scores.layers == [1, 2, 3, 4]
    assert all(abs(s) > 1e-4 for s in scores.shift)


def test_identity_layer_scores_zero(tiny_llama):
    model = elo.load_model(tiny_llama[0])
    with torch.no_grad():  # attention and MLP add nothing: layer 2 returns its input
        model.model.layers["1"].self_attn.o_proj.weight.zero_()
        model.model.layers["1"].mlp.down_proj.weight.zero_()
    scores = elo.layer_scores(model, DATA)
    for lang in ("ko", "en"):
        assert scores.influence[lang][1] == pytest.approx(0, abs=1e-12)
        assert min(scores.influence[lang][i] for i in (0, 2, 3)) > 1e-3
    assert scores.shift[1] == pytest.approx(0, abs=1e-12)


def test_scores_do_not_depend_on_batch_order(tiny_llama):
    model = elo.load_model(tiny_llama[0])
    a = elo.layer_scores(model, DATA)
    b = elo.layer_scores(model, {"en": DATA["en"][::-1], "ko": DATA["ko"][::-1]})
    assert b.influence["ko"] == pytest.approx(a.influence["ko"], rel=1e-12)
    assert b.influence["en"] == pytest.approx(a.influence["en"], rel=1e-12)
    assert b.shift == pytest.approx(a.shift, rel=1e-12)


def test_suggested_layers_and_table(tiny_llama):
    scores = elo.layer_scores(elo.load_model(tiny_llama[0]), DATA, k=3)
    bi = scores.influence["ko"]
    assert scores.target == "ko" and scores.suggested == sorted(sorted(range(1, 5), key=lambda n: -bi[n - 1])[:3])
    table = scores.table().splitlines()
    assert len(table) == 5 and "BI ko" in table[0] and "shift" in table[0]
    assert sum("*" in row for row in table[1:]) == 3


def test_texts_with_a_tokenizer(tiny_with_tokenizer):
    model, tok = elo.load_model(tiny_with_tokenizer), elo.load_tokenizer(tiny_with_tokenizer)
    scores = elo.layer_scores(model, {"ko": ["안녕하세요, 세계."] * 3, "en": ["Hello, world."] * 3}, tokenizer=tok)
    assert scores.tokens["ko"] > scores.tokens["en"] > 0 and len(scores.suggested) == 2


@pytest.mark.parametrize("data, kwargs, message", [
    ({"ko": DATA["ko"]}, {}, "exactly two languages, one of them 'en'; got ['ko']"),
    ({"ko": DATA["ko"], "ja": DATA["en"]}, {}, "one of them 'en'"),
    (DATA, dict(k=5), "k=5; expected 1..4"),
    ({"ko": ["text"], "en": ["text"]}, {}, "pass tokenizer="),
    ({"ko": [], "en": DATA["en"]}, {}, "no tokens for language 'ko'"),
])
def test_bad_input_is_a_one_line_error(tiny_llama, data, kwargs, message):
    with pytest.raises(ValueError) as e:
        elo.layer_scores(elo.load_model(tiny_llama[0]), data, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_refuses_a_submodel(tiny_llama):
    with pytest.raises(ValueError, match="needs the full model"):
        elo.layer_scores(elo.load_detached(tiny_llama[0], [1, 4]), DATA)
