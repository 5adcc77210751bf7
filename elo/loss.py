"""Cross-entropy of the LM head fused with the head itself, computed in row chunks.

The usual path materialises logits (tokens x vocab), then log-softmax, then in backward a zero-filled gradient and
the log-softmax gradient: four passes over a tokens x vocab buffer, which for ELO's 2-layer model cost as much time
as the two decoder layers. Here each chunk's logits become their own gradient (softmax minus one-hot) in place, in
the forward pass, and are multiplied straight into the gradients of the hidden states and (if it trains) the head
weight; the backward pass only scales those by the incoming gradient. Same math, one pass, chunk-sized memory.
"""
from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ROWS = 1024


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, need_hidden: bool, need_weight: bool):
        n = hidden.shape[0]
        losses = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for s in range(0, n, CHUNK_ROWS):
            h, t = hidden[s:s + CHUNK_ROWS], targets[s:s + CHUNK_ROWS]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            valid = t >= 0
            index = t.clamp(min=0)
            losses[s:s + len(t)] = (lse - logits.gather(1, index[:, None]).squeeze(1)) * valid
            if need_hidden or need_weight:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                grad[torch.arange(len(t), device=grad.device), index] -= 1
                grad.mul_(valid[:, None])
                grad = grad.to(hidden.dtype)
                if need_hidden:
                    grad_hidden[s:s + len(t)] = grad @ weight
                if need_weight:
                    grad_weight.add_((grad.T @ h).float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(losses)
        return losses.sum(), losses

    @staticmethod
    def backward(ctx, grad_sum: Tensor, _grad_losses: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_sum.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_sum).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


def head_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of token losses, per-token losses) of `hidden @ weight.T` against `targets` (< 0: ignored).

    Only the sum carries gradients; the per-token losses are for logging."""
    shape = targets.shape
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    grad = torch.is_grad_enabled()
    need_hidden, need_weight = grad and hidden.requires_grad, grad and weight.requires_grad
    total, losses = _HeadCrossEntropy.apply(hidden, weight, targets, need_hidden, need_weight)
    return total, losses.view(shape)
