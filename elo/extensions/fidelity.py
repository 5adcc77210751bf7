"""Gradient fidelity: how well the ELO submodel's gradient for a chosen layer stands in for the gradient that layer
gets inside the full model, on the same batches.

ELO trains layers 1 and n of a submodel in which layer n reads layer 1's output directly; the full model puts the
middle layers between them. Whether the cheap phase helps depends on whether the submodel pushes each layer where
the full model would: the cosine between the two gradients (1: the same direction; 0: unrelated) and the ratio of
their norms. Both gradients are of the mean token loss over all the batches together, for the same parameter values.

    report = gradient_fidelity(base, "1,30", batches)                  # the plain submodel
    report = gradient_fidelity(base, "1,30", batches, middle=surrogate)  # with a stand-in for the middle
    report["layers"][30]["cosine"], report["loss_submodel"], report["loss_full"]
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from elo.extensions.hidden import input_ids
from elo.model import MiddleSurrogate, Transformer, attach_middle
from elo.surgery import detach, parse_layers
from elo.train.distributed import Dist, all_reduce_sum, local


def _layer_gradients(model: Transformer, pairs: list[tuple[Tensor, Tensor]], keys: list[str],
                     d: Dist) -> tuple[dict[str, list[Tensor]], float]:
    """This process's part of the gradient of the mean token loss over every process's `pairs` for each decoder
    layer in `keys` (its parameters in name order, fp64; under FSDP2 each rank's rows), and that loss."""
    params = {k: [p for _, p in sorted(model.model.layers[k].named_parameters())] for k in keys}
    for p in model.parameters():
        p.grad = None
    count = all_reduce_sum(torch.tensor(float(sum(int((t >= 0).sum()) for _, t in pairs))), d).item()
    total = 0.0
    for inputs, targets in pairs:
        loss, _ = model(inputs.to(d.device), targets=targets.to(d.device))
        (loss * d.world_size / count).backward()  # FSDP2 averages gradients over ranks: this makes it sum / count
        total += loss.item()
    grads = {k: [local(p.grad).double().flatten() for p in ps] for k, ps in params.items()}
    for p in model.parameters():
        p.grad = None
    return grads, all_reduce_sum(torch.tensor(total), d).item() / count


def compare_gradients(full: Transformer, sub: Transformer, pairs: list[tuple[Tensor, Tensor]], layers: list[int],
                      d: Dist) -> dict:
    """gradient_fidelity's measurement on two built models: `full` and `sub` (the submodel, its stand-in attached)
    hold the same values for `layers` (1-based), plain or both sharded by FSDP2 alike (then each rank passes its
    own `pairs`, and the dot products are summed over ranks)."""
    keys = [str(i - 1) for i in layers]
    modes = full.training, sub.training
    full.train()
    sub.train()
    full_grads, full_loss = _layer_gradients(full, pairs, keys, d)
    sub_grads, sub_loss = _layer_gradients(sub, pairs, keys, d)
    full.train(modes[0])
    sub.train(modes[1])
    report = {"loss_full": full_loss, "loss_submodel": sub_loss, "layers": {}}
    for k in keys:
        dot, sub_sq, full_sq = all_reduce_sum(torch.stack([
            sum((a * b).sum() for a, b in zip(sub_grads[k], full_grads[k])),
            sum((a * a).sum() for a in sub_grads[k]), sum((b * b).sum() for b in full_grads[k])]), d).tolist()
        report["layers"][int(k) + 1] = {"cosine": dot / max(math.sqrt(sub_sq * full_sq), 1e-300),
                                        "norm_ratio": math.sqrt(sub_sq) / max(math.sqrt(full_sq), 1e-300)}
    return report


def token_pairs(batches: Iterable) -> list[tuple[Tensor, Tensor]]:
    """(inputs, targets) of each batch: an elo Batch, or a bare LongTensor [batch, seq] that predicts its own next
    token."""
    pairs = []
    for batch in batches:
        ids = input_ids(batch)
        targets = getattr(batch, "targets", None)
        if targets is None:
            ids, targets = ids[:, :-1], ids[:, 1:]
        pairs.append((ids, targets))
    if not pairs:
        raise ValueError("no batches given; expected at least one token id batch")
    return pairs


def gradient_fidelity(base: Transformer, layers: Sequence[int] | str, batches: Iterable,
                      middle: MiddleSurrogate | None = None) -> dict:
    """Per chosen layer (1-based, as for `detach`): the cosine and norm ratio (submodel / full) between the ELO
    submodel's gradient and the full model's gradient for that layer's parameters, on `batches` (token id batches:
    a LongTensor [batch, seq] or an elo Batch with `.inputs` / `.targets`; a bare tensor predicts its next token);
    and the two losses. `middle` is attached to the submodel first. `base` is left unchanged."""
    ids = parse_layers(layers, base.config.num_hidden_layers)
    pairs = token_pairs(batches)
    sub = detach(base, [i + 1 for i in ids])
    if middle is not None:
        attach_middle(sub, middle)
    return compare_gradients(base, sub, pairs, [i + 1 for i in ids], Dist(0, 1, base.device))
