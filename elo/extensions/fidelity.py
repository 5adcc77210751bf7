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

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from elo.extensions.hidden import input_ids
from elo.model import MiddleSurrogate, Transformer, attach_middle
from elo.surgery import detach, parse_layers


def _layer_gradients(model: Transformer, batches: list[tuple[Tensor, Tensor]], keys: list[str]) -> tuple[
        dict[str, Tensor], float]:
    """The gradient of the mean token loss over `batches` for each decoder layer in `keys` (its parameters
    flattened in name order, fp64), and that loss."""
    params = {k: [p for _, p in sorted(model.model.layers[k].named_parameters())] for k in keys}
    for p in model.parameters():
        p.grad = None
    total, count = 0.0, sum(int((t >= 0).sum()) for _, t in batches)
    for inputs, targets in batches:
        loss, _ = model(inputs.to(model.device), targets=targets.to(model.device))
        (loss / count).backward()
        total += loss.item()
    grads = {k: torch.cat([p.grad.double().flatten() for p in ps]) for k, ps in params.items()}
    for p in model.parameters():
        p.grad = None
    return grads, total / count


def gradient_fidelity(base: Transformer, layers: Sequence[int] | str, batches: Iterable,
                      middle: MiddleSurrogate | None = None) -> dict:
    """Per chosen layer (1-based, as for `detach`): the cosine and norm ratio (submodel / full) between the ELO
    submodel's gradient and the full model's gradient for that layer's parameters, on `batches` (token id batches:
    a LongTensor [batch, seq] or an elo Batch with `.inputs` / `.targets`; a bare tensor predicts its next token);
    and the two losses. `middle` is attached to the submodel first. `base` is left unchanged."""
    ids = parse_layers(layers, base.config.num_hidden_layers)
    pairs = []
    for batch in batches:
        ids_ = input_ids(batch)
        targets = getattr(batch, "targets", None)
        if targets is None:  # next-token targets within the batch itself
            ids_, targets = ids_[:, :-1], ids_[:, 1:]
        pairs.append((ids_, targets))
    if not pairs:
        raise ValueError("no batches given; expected at least one token id batch")
    keys = [str(i) for i in ids]
    sub = detach(base, [i + 1 for i in ids])
    if middle is not None:
        attach_middle(sub, middle)
    was_training = base.training
    base.train()
    sub.train()
    full_grads, full_loss = _layer_gradients(base, pairs, keys)
    sub_grads, sub_loss = _layer_gradients(sub, pairs, keys)
    base.train(was_training)
    report = {"loss_full": full_loss, "loss_submodel": sub_loss, "layers": {}}
    for k in keys:
        g_sub, g_full = sub_grads[k], full_grads[k]
        report["layers"][int(k) + 1] = {
            "cosine": float(g_sub @ g_full / (g_sub.norm() * g_full.norm()).clamp_min(1e-300)),
            "norm_ratio": float(g_sub.norm() / g_full.norm().clamp_min(1e-300)),
        }
    return report
