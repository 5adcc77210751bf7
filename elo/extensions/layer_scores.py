"""Per-layer scores from one forward pass over target-language text and one over English, to see which decoder layers
do language-specific work and to suggest layers for ELO.

Block influence (ShortGPT, Men et al. 2024), per language: BI = 1 − the mean over tokens of cos(h_in, h_out), how much
a layer turns the hidden state. A layer that changes nothing scores 0.

Language shift (elo's own): how much a layer changes how far apart the two languages' hidden states lie. With u the
unit-normalised hidden state, μ_L its mean over language L's tokens and v_L = 1 − ‖μ_L‖² = E‖u − μ_L‖² its spread,
sep = ‖μ_A − μ_B‖² / ((v_A + v_B) / 2) is a probe-free, Fisher-like ratio of between- to within-language spread
(the common offset of all hidden states cancels in μ_A − μ_B). shift = sep(h_out) − sep(h_in): positive when the
layer pulls the languages apart, negative when it merges them into a shared space; either way the layer treats the
languages differently. An identity layer scores 0.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from elo.data.text import TextTokenizer, text_windows
from elo.extensions.hidden import layer_states
from elo.model import Transformer


@dataclass(frozen=True)
class LayerScores:
    layers: list[int]  # 1-based layer numbers, bottom to top
    influence: dict[str, list[float]]  # language -> block influence of each layer
    shift: list[float]  # language shift of each layer (target vs reference)
    tokens: dict[str, int]  # tokens read per language
    target: str
    reference: str
    suggested: list[int]  # 1-based, sorted; the rule is in layer_scores' docstring

    def table(self) -> str:
        """The scores as a text table, one row per layer, suggested layers marked with *."""
        langs = [self.target, self.reference]
        head = f"{'layer':>5}  " + "  ".join(f"{'BI ' + l:>9}" for l in langs) + f"  {'shift':>8}"
        rows = [head] + [
            f"{n:>4}{'*' if n in self.suggested else ' '}  "
            + "  ".join(f"{self.influence[l][i]:>9.4f}" for l in langs) + f"  {self.shift[i]:>+8.4f}"
            for i, n in enumerate(self.layers)]
        return "\n".join(rows)


def layer_scores(model: Transformer, data: Mapping[str, Iterable[Tensor] | Iterable[str]],
                 tokenizer: TextTokenizer | None = None, k: int = 2, reference: str = "en",
                 seq_len: int = 512) -> LayerScores:
    """Scores of every decoder layer of the full model `model` from `data`: {language: token id batches (LongTensor
    [batch, seq] or elo.data.text.Batch)}, or {language: texts} with `tokenizer` (packed into `seq_len` windows), for
    exactly two languages, one of them `reference`.

    Suggested layers: the k layers of largest block influence on the target language, i.e. those that change its
    hidden states most (ShortGPT's importance ranking; ties go to the lower layer). On SmolLM2-135M with Korean this
    picks 1 and 30, the first and last layers that the paper finds best (Table 3). `shift` is reported beside it, not
    used by the rule: on that model it singles out the last layer clearly but is noisy across the middle ones."""
    if reference not in data or len(data) != 2:
        raise ValueError(f"layer_scores needs text in exactly two languages, one of them {reference!r}; got "
                         f"{sorted(data)}")
    n_layers = len(model.model.layers)
    if model.config.elo is not None:
        raise ValueError(f"layer_scores needs the full model; this is an ELO submodel of {model.config.elo['base']!r}")
    if not 1 <= k <= n_layers:
        raise ValueError(f"k={k}; expected 1..{n_layers} layers for this {n_layers}-layer model")
    target = next(l for l in data if l != reference)
    keys, device = list(model.model.layers), model.device
    influence, means, tokens = {}, {}, {}
    for lang in (target, reference):
        batches = text_windows(data[lang], tokenizer, seq_len) if tokenizer is not None else data[lang]
        cos = torch.zeros(len(keys), dtype=torch.float64, device=device)
        unit = torch.zeros(len(keys), 2, model.config.hidden_size, dtype=torch.float64, device=device)  # Σ u_in, u_out
        n = 0
        for batch in batches:
            if isinstance(batch, str):
                raise ValueError("data holds texts; pass tokenizer= to score texts, or token id batches")
            states = layer_states(model, batch, keys)
            for i, key in enumerate(keys):
                h_in, h_out = (h.double().flatten(0, 1) for h in states[key])
                cos[i] += F.cosine_similarity(h_in, h_out, dim=-1).sum()
                unit[i, 0] += F.normalize(h_in, dim=-1).sum(0)
                unit[i, 1] += F.normalize(h_out, dim=-1).sum(0)
            n += len(h_in)
        if n == 0:
            raise ValueError(f"no tokens for language {lang!r}")
        influence[lang], means[lang], tokens[lang] = (1 - cos / n).tolist(), unit / n, n
    mu_a, mu_b = means[target], means[reference]
    spread = 1 - (mu_a.pow(2).sum(-1) + mu_b.pow(2).sum(-1)) / 2
    sep = (mu_a - mu_b).pow(2).sum(-1) / spread  # (layer, in/out)
    shift = (sep[:, 1] - sep[:, 0]).tolist()
    picked = sorted(range(n_layers), key=lambda i: (-influence[target][i], i))[:k]
    return LayerScores(layers=list(range(1, n_layers + 1)), influence=influence, shift=shift, tokens=tokens,
                       target=target, reference=reference, suggested=sorted(i + 1 for i in picked))
