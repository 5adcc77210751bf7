"""A distilled stand-in for the middle layers: K real decoder blocks per gap, trained once per base model to do what
the skipped layers do (Offsite-Tuning's emulator, arXiv 2302.04870).

A linear map (elo.extensions.middle) moves each position's hidden state on its own; the skipped layers also attend
across positions and gate features. `distill_middle` starts K decoder blocks per gap as copies of K of the skipped
layers, evenly spaced (with K the whole gap, they are the middle itself), and trains only them, in the submodel whose
embedding, chosen layers, norm and head stay at their base weights, to match the full model: the squared error of
the hidden state entering each upper chosen layer (relative to that state's own) plus KL(full || submodel) of the
next-token distribution. The blocks are then frozen (buffers, as the linear maps are): `attach_middle` puts them in
the submodel, `save_middle` writes them to middle.safetensors, and ELO trains its layers through them.

    stand_in = distill_middle(base, "1,30", (sampler.next_batch(8) for _ in itertools.count()), tokens=200_000,
                              blocks=2, steps=500)
    stand_in.stats["mse"], stand_in.stats["kl"]   # held out, after distilling ("mse_init", "kl_init": before)
    stand_in.stats["fidelity"]                    # held-out gradient cosine per chosen layer (elo.gradient_fidelity)
    attach_middle(submodel, stand_in)

Memory: the full base model (the teacher) and the submodel beside it.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from elo.extensions.fidelity import gradient_fidelity
from elo.extensions.hidden import input_ids
from elo.extensions.middle import middle_gaps
from elo.hf.checkpoint import load_config, load_model
from elo.hf.hub import resolve
from elo.loss import CHUNK_ROWS
from elo.model import MiddleBlocks, MiddleSurrogate, Transformer
from elo.surgery import detach


def spaced(lo: int, hi: int, k: int) -> list[int]:
    """K of the layers strictly between `lo` and `hi` (0-based), evenly spaced: the middle one of each of K equal
    runs of the skipped layers (all of them when K is their number)."""
    skipped = hi - lo - 1
    return [lo + 1 + (2 * b + 1) * skipped // (2 * k) for b in range(k)]


def _split(data: Iterable, tokens: int, held_out: int, accumulate: int) -> tuple[list[list[Tensor]], list[Tensor]]:
    """Token id batches from the start of `data`, in groups of `accumulate` (one step's): the groups that reach
    `tokens` tokens, to train on, then the batches of as many groups as reach `held_out` more, to measure on."""
    parts, counts = ([], []), [0, 0]
    for batch in data:
        if isinstance(batch, str):
            raise ValueError("data holds texts; expected token id batches (elo.data.text.text_windows makes them)")
        part = 0 if counts[0] < tokens or len(parts[0]) % accumulate else 1
        parts[part].append(input_ids(batch))
        counts[part] += parts[part][-1].numel()
        if counts[1] >= held_out and len(parts[1]) % accumulate == 0:
            fit, test = parts
            return [fit[i:i + accumulate] for i in range(0, len(fit), accumulate)], test
    raise ValueError(f"the data ran out after {sum(counts)} tokens; distilling needs tokens + held_out = "
                     f"{tokens + held_out} (in whole batches)")


def _states(model: Transformer, ids: Tensor, keys: list[str]) -> tuple[list[Tensor], Tensor]:
    """The hidden state entering each decoder layer of `keys`, and the final-norm hidden state, of one forward pass."""
    entering = {}

    def grab(key: str):
        def hook(module, args):
            entering[key] = args[0]
        return hook

    handles = [model.model.layers[k].register_forward_pre_hook(grab(k)) for k in keys]
    try:
        final = model.hidden_states(ids)
    finally:
        for h in handles:
            h.remove()
    return [entering[k] for k in keys], final


def _kl_chunk(student: Tensor, teacher: Tensor, head: Tensor) -> Tensor:
    log_q = torch.log_softmax(F.linear(student, head).float(), -1)
    log_p = torch.log_softmax(F.linear(teacher, head).float(), -1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum")


def _kl_sum(student: Tensor, teacher: Tensor, head: Tensor) -> Tensor:
    """Σ over positions of KL(teacher || student) of the next-token distributions of these final hidden states, in row
    chunks whose logits the backward pass recomputes rather than keeps: no tokens x vocab tensor is ever held."""
    s, t = student.flatten(0, -2), teacher.flatten(0, -2)
    return sum(checkpoint(_kl_chunk, s[i:i + CHUNK_ROWS], t[i:i + CHUNK_ROWS], head, use_reentrant=False)
               for i in range(0, len(s), CHUNK_ROWS))


def _losses(student: Transformer, teacher: Transformer, ids: Tensor, keys: list[str]) -> tuple[Tensor, Tensor]:
    """Sums over the positions of one batch of `student`'s errors against the full model `teacher`: for the state
    entering each upper layer [gaps], ‖student − full‖² / ‖full‖² (relative to each position's own, so that the
    few positions with huge hidden states do not drown the rest); and KL(full || student), next-token."""
    ids = ids.to(teacher.device)
    with torch.no_grad():
        want, want_final = _states(teacher, ids, keys)
    got, got_final = _states(student, ids, keys)
    mse = torch.stack([((g - w).pow(2).sum(-1) / w.pow(2).sum(-1)).sum() for g, w in zip(got, want)])
    return mse, _kl_sum(got_final, want_final, student.lm_head.weight)


@torch.no_grad()
def _evaluate(student: Transformer, teacher: Transformer, batches: list[Tensor],
              keys: list[str]) -> tuple[list[float], float]:
    """Relative squared error per gap and KL, means over the positions of `batches`."""
    n = sum(b.numel() for b in batches)
    mse, kl = torch.zeros(len(keys), dtype=torch.float64), 0.0
    for ids in batches:
        m, k = _losses(student, teacher, ids, keys)
        mse += m.double().cpu() / n
        kl += k.item() / n
    return mse.tolist(), kl


def distill_middle(model: Transformer | str | os.PathLike, layers: Sequence[int] | str, data: Iterable,
                   tokens: int, blocks: int = 1, steps: int = 200, lr: float = 1e-4, accumulate: int = 1,
                   held_out: int | None = None, seed: int = 0,
                   device: str | torch.device = "cpu") -> MiddleSurrogate:
    """Distil `blocks` decoder blocks per gap between `layers` (1-based, as for `detach`) of the full model `model` (a
    Transformer, or a path loaded on `device`); `blocks` is at most the number of layers any gap skips.

    `data`: token id batches, each a LongTensor [batch, seq] or an elo.data.text.Batch (e.g. a generator over
    `sampler.next_batch(B)`). Whole batches from its start, up to `tokens` token positions, are trained on: `steps`
    AdamW steps (learning rate `lr`, no weight decay: the blocks start as real layers) of `accumulate` batches each
    (train.py: a training step's global batch, so that the stand-in does not depend on how many processes share
    it), the steps' order shuffled by `seed` at every pass over them. The loss is the mean over positions of the
    relative squared error of each gap (`_losses`) plus the KL. `held_out` more tokens (default tokens // 10; at least
    one step's batches) from the batches after them give the held-out figures in `stats`. Deterministic on CPU.

    `stats` (JSON, beside the common ones, see MiddleSurrogate): blocks, init_layers (per gap, the 1-based layers the
    blocks began as), tokens and held_out (as used: whole batches), steps, lr, accumulate, seed; held out, before
    and after distilling: mse_init, mse (relative squared error per gap), kl_init, kl (per position); fidelity and
    fidelity_plain (gradient cosine per chosen layer, elo.gradient_fidelity, with the stand-in and without one);
    config (the base's config.json, which load_middle builds the blocks from)."""
    config = model.config if isinstance(model, Transformer) else load_config(resolve(model))
    ids, gaps = middle_gaps(config, layers, "distill_middle")
    chosen = [i + 1 for i in ids]
    fewest = min(hi - lo - 1 for lo, hi in gaps)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= fewest:
        raise ValueError(f"blocks={blocks!r}; expected an integer from 1 to {fewest}, the fewest layers a gap between "
                         f"layers {chosen} skips")
    if tokens < 1 or steps < 0 or accumulate < 1:
        raise ValueError(f"tokens={tokens}, steps={steps}, accumulate={accumulate}; expected tokens >= 1, steps >= 0 "
                         f"and accumulate >= 1")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr}; expected a finite number > 0")
    held_out = max(1, tokens // 10) if held_out is None else held_out
    if held_out < 1:
        raise ValueError(f"held_out={held_out}; expected at least 1 token to measure on")

    start = time.perf_counter()
    if not isinstance(model, Transformer):
        model = load_model(model, device=device)
    fit, test = _split(data, tokens, held_out, accumulate)
    init = [spaced(lo, hi, blocks) for lo, hi in gaps]
    stand_in = MiddleSurrogate({str(hi): MiddleBlocks([copy.deepcopy(model.model.layers[str(j)]).float() for j in js],
                                                      [config.window(j) for j in js])
                                for (_, hi), js in zip(gaps, init)}, stats={})
    student = detach(model, chosen).requires_grad_(False)
    student.middle = stand_in.requires_grad_(True)
    keys = list(stand_in)
    mse_init, kl_init = _evaluate(student, model, test, keys)

    optimizer = torch.optim.AdamW(stand_in.parameters(), lr=lr, weight_decay=0.0)
    generator, order = torch.Generator().manual_seed(seed), []
    every = max(1, steps // 10)
    for step in range(1, steps + 1):
        if not order:
            order = torch.randperm(len(fit), generator=generator).tolist()
        group = fit[order.pop()]
        n = sum(batch.numel() for batch in group)
        optimizer.zero_grad(set_to_none=True)
        mse, kl = 0.0, 0.0
        for batch in group:
            m, k = _losses(student, model, batch, keys)
            ((m.sum() + k) / n).backward()
            mse, kl = mse + m.detach() / n, kl + k.item() / n
        optimizer.step()
        if step % every == 0 or step == steps:
            print(f"middle distill: step {step}/{steps}, loss {mse.sum().item() + kl:.4f} (relative mse "
                  f"{_floats(mse.tolist())}, kl {kl:.4f}), {time.perf_counter() - start:.0f}s", file=sys.stderr,
                  flush=True)
    for gap_blocks in stand_in.values():
        gap_blocks.freeze()

    mse_final, kl_final = _evaluate(student, model, test, keys)
    stand_in.stats = {
        "kind": "distilled", "blocks": blocks, "init_layers": [[j + 1 for j in js] for js in init],
        "tokens": sum(batch.numel() for group in fit for batch in group), "held_out": sum(b.numel() for b in test),
        "steps": steps, "lr": lr, "accumulate": accumulate, "seed": seed, "layers": chosen,
        "gaps": [[lo + 1, hi + 1] for lo, hi in gaps],
        "mse_init": mse_init, "kl_init": kl_init, "mse": mse_final, "kl": kl_final, "hidden_size": config.hidden_size,
        "fingerprint": model.fingerprint(), "base": model.name_or_path,
        "config": json.loads(json.dumps(config.to_hf())),  # what load_middle builds the blocks from
    }
    # the gate: does the submodel now push the chosen layers where the full model would (1: the same direction)?
    for name, middle in (("fidelity", stand_in), ("fidelity_plain", None)):
        report = gradient_fidelity(model, chosen, test, middle=middle)
        stand_in.stats[name] = {str(layer): r["cosine"] for layer, r in report["layers"].items()}
    stand_in.stats["seconds"] = time.perf_counter() - start
    print(f"middle distill: held out, relative mse {_floats(mse_init)} -> {_floats(mse_final)}, kl {kl_init:.4f} -> "
          f"{kl_final:.4f}; gradient cosine of layers {', '.join(stand_in.stats['fidelity'])}: "
          f"{_floats(stand_in.stats['fidelity'].values())} (without the stand-in "
          f"{_floats(stand_in.stats['fidelity_plain'].values())})", file=sys.stderr, flush=True)
    return stand_in


def _floats(values: Iterable[float]) -> str:
    return ", ".join(f"{v:.4f}" for v in values)
