"""A fitted surrogate of the middle layers, so that ELO trains its layers on the inputs they see in the full model.

In an ELO submodel holding layers 1 and 30, layer 30 reads layer 1's output directly; in the full model it reads what
layers 2..29 made of it. `fit_middle` runs the full base model over N tokens and fits, for each gap between
consecutive chosen layers, a ridge least-squares map with bias from the hidden state after the lower layer to the
hidden state entering the upper one. `attach_middle` puts the maps, frozen, into the submodel (`Transformer.middle`),
which applies each before the upper layer. The fit streams: it accumulates [X 1]ᵀ[X 1] and [X 1]ᵀY in fp64 (about
2 d² numbers per gap for the fitted tokens and as many for the held-out ones, never N × d) and solves once.

Feeding it from the training mixture (elo.data.text.MixtureSampler), with a sampler of its own so that training's stream
is untouched:

    surrogate = fit_middle(base, "1,30", (sampler.next_batch(8) for _ in itertools.count()), tokens=12_000)
    print(surrogate.stats["r2"])                     # held-out R² per gap
    attach_middle(submodel, surrogate)               # submodel.middle = surrogate
    save_middle(surrogate, out)                      # out/middle.safetensors, fit statistics in its metadata
    attach_middle(submodel, load_middle(out))        # resume: the same maps, bit for bit

`save_model` of a submodel with a surrogate writes `middle.safetensors` beside the HF files (transformers ignores it)
and `load_model` of such a directory attaches it again.
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from elo.config import ModelConfig
from elo.data.text import TextTokenizer, text_windows
from elo.extensions.hidden import input_ids, layer_states
from elo.hf.checkpoint import load_config, load_model
from elo.hf.hub import resolve
from elo.model import FrozenAffine, MiddleSurrogate, Transformer
from elo.surgery import parse_layers

KINDS = ("linear", "distilled")  # fit_middle here; distill_middle in elo.extensions.distill


class _Moments:
    """Sufficient statistics of Y ≈ [X 1] w, in fp64: [X 1]ᵀ[X 1], [X 1]ᵀY, Σ‖y‖² and the row count."""

    def __init__(self, d: int, device: torch.device):
        self.xx = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=device)
        self.xy = torch.zeros(d + 1, d, dtype=torch.float64, device=device)
        self.yy = torch.zeros((), dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: Tensor, y: Tensor) -> None:
        x1 = torch.cat([x.double(), x.new_ones(len(x), 1, dtype=torch.float64)], 1)
        y = y.double()
        self.xx.addmm_(x1.T, x1)
        self.xy.addmm_(x1.T, y)
        self.yy += y.pow(2).sum()
        self.n += len(x)

    def solve(self, ridge: float) -> Tensor:
        """w (d + 1, d), last row the bias, minimising ‖[X 1] w − Y‖² + λ‖W‖² (the bias is not penalised), with
        λ = ridge · tr(centred XᵀX) / d, a fraction of the mean variance, so that `ridge` is free of the scale of h."""
        d, n = self.xy.shape[1], self.n
        mean_x, mean_y = self.xx[:d, d] / n, self.xy[d] / n
        sxx = self.xx[:d, :d] - n * torch.outer(mean_x, mean_x)  # centring removes the bias from the solve
        sxy = self.xy[:d] - n * torch.outer(mean_x, mean_y)
        lam = ridge * sxx.diagonal().sum() / d
        w = torch.linalg.solve(sxx + lam * torch.eye(d, dtype=sxx.dtype, device=sxx.device), sxy)
        return torch.cat([w, (mean_y - mean_x @ w)[None]])

    def r2(self, w: Tensor) -> float:
        """1 − residual / total sum of squares of these rows under w, over all hidden dimensions together (the
        fraction of the hidden state's variance the map explains)."""
        rss = self.yy - 2 * (w * self.xy).sum() + (w * (self.xx @ w)).sum()
        tss = self.yy - self.xy[-1].pow(2).sum() / self.n
        return float(1 - rss / tss)


def accumulate(model: Transformer, gaps: list[tuple[int, int]], data: Iterable, tokens: int,
               held_out: int) -> tuple[dict[tuple[int, int], _Moments], dict[tuple[int, int], _Moments]]:
    """Moments of the fitted and the held-out tokens for each gap (lower, upper: 0-based layer indices), in one pass
    over `data` (token id batches) through the full model."""
    d, dev = model.config.hidden_size, model.device
    fit = {g: _Moments(d, dev) for g in gaps}
    test = {g: _Moments(d, dev) for g in gaps}
    # the input of layer hi is the output of layer hi - 1: read outputs only, and stop below the highest upper layer
    keys = {str(i) for lo, hi in gaps for i in (lo, hi - 1)}
    need, seen = tokens + held_out, 0
    start = report = time.monotonic()
    for batch in data:
        if isinstance(batch, str):
            raise ValueError("data holds texts; pass tokenizer= to fit on texts, or token id batches")
        states = layer_states(model, batch, keys)
        # the batch where fitting ends is not held out in part: held-out tokens share no sequence with fitted ones
        moments, take = (fit, tokens - seen) if seen < tokens else (test, need - seen)
        take = min(input_ids(batch).numel(), take)
        for lo, hi in gaps:
            moments[lo, hi].add(states[str(lo)][1].reshape(-1, d)[:take], states[str(hi - 1)][1].reshape(-1, d)[:take])
        seen += take
        if seen == need:
            return fit, test
        if time.monotonic() - report > 10:  # a big fit runs for minutes: say how far it is
            report, elapsed = time.monotonic(), time.monotonic() - start
            print(f"middle fit: {seen:,} / {need:,} tokens, {elapsed:.0f}s, about {elapsed * (need - seen) / seen:.0f}s "
                  f"left", file=sys.stderr, flush=True)
    raise ValueError(f"the data ran out after {seen} tokens; fitting needs tokens + held_out = {need}")


def middle_gaps(config: ModelConfig, layers: Sequence[int] | str, who: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The chosen layers (1-based `layers` -> sorted 0-based) and the gaps between them ((lower, upper), 0-based;
    adjacent layers leave none), after checking that `config` is a full base model's and that there is a middle."""
    if config.elo is not None:
        raise ValueError(f"{who} needs the full base model; this is an ELO submodel of {config.elo['base']!r}")
    ids = parse_layers(layers, config.num_hidden_layers)
    if len(ids) < 2:
        raise ValueError(f"a middle surrogate needs at least 2 layers to stand between; got layers {layers!r}")
    gaps = [(lo, hi) for lo, hi in zip(ids, ids[1:]) if hi > lo + 1]
    if not gaps:
        raise ValueError(f"layers {layers!r} are adjacent: there are no middle layers for a surrogate to replace")
    return ids, gaps


def fit_middle(model: Transformer | str | os.PathLike, layers: Sequence[int] | str,
               data: Iterable[Tensor] | Iterable[str], tokens: int, ridge: float = 1e-2,
               held_out: int | None = None, tokenizer: TextTokenizer | None = None, seq_len: int = 512,
               device: str | torch.device = "cpu") -> MiddleSurrogate:
    """Fit the surrogate of the layers between `layers` (1-based, as for `detach`) of the full model `model` (a
    Transformer, or a path loaded on `device`).

    `data`: token id batches, each a LongTensor [batch, seq] or an elo.data.text.Batch (e.g. a generator over
    `sampler.next_batch(B)`), or, with `tokenizer`, texts (packed into `seq_len` windows). The stream's first `tokens`
    token positions are fitted; `held_out` more (default tokens // 10), from the batches after the last one fitted on,
    give the R² in `stats["r2"]`.
    Adjacent layers leave no gap and get no map. `ridge`: see `_Moments.solve`; 0 is plain least squares."""
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge={ridge}; expected a finite number >= 0")
    config = model.config if isinstance(model, Transformer) else load_config(resolve(model))
    ids, gaps = middle_gaps(config, layers, "fit_middle")
    d = config.hidden_size
    if tokens < d + 1:
        raise ValueError(f"tokens={tokens} is too few to fit a map on hidden size {d}; expected at least {d + 1}")
    held_out = tokens // 10 if held_out is None else held_out
    if held_out < 1:
        raise ValueError(f"held_out={held_out}; expected at least 1 token to measure R² on")
    if tokenizer is not None:
        data = text_windows(data, tokenizer, seq_len)

    start = time.perf_counter()
    if not isinstance(model, Transformer):
        model = load_model(model, device=device)
    fit, test = accumulate(model, gaps, data, tokens, held_out)
    maps, r2 = {}, []
    for g in gaps:
        w = fit[g].solve(ridge)
        r2.append(test[g].r2(w))
        maps[str(g[1])] = FrozenAffine(w[:d].T.float().contiguous(), w[d].float())
    stats = {"kind": "linear", "ridge": ridge, "tokens": tokens, "held_out": held_out, "layers": [i + 1 for i in ids],
             "gaps": [[lo + 1, hi + 1] for lo, hi in gaps], "r2": r2, "hidden_size": d,
             "fingerprint": model.fingerprint(),
             "base": model.name_or_path, "seconds": time.perf_counter() - start}
    return MiddleSurrogate(maps, stats)
