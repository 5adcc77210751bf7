"""Cross-entropy of the LM head fused with the head itself, computed in row chunks.

The usual path materialises logits (tokens x vocab), then log-softmax, then in backward a zero-filled gradient and
the log-softmax gradient: several passes over a tokens x vocab buffer, which for ELO's 2-layer model cost as much time
as the two decoder layers. Here each chunk's log-softmax (one fused pass) becomes its own gradient (softmax minus
one-hot) in place, in the forward pass, and is multiplied straight into the gradients of the hidden states and (if
it trains) the head weight; the backward pass only scales those by the incoming gradient. Same math, two passes
instead of several, chunk-sized memory.
"""
from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ROWS = 512


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, need_hidden: bool, need_weight: bool):
        n, rows = hidden.shape[0], min(CHUNK_ROWS, hidden.shape[0])
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        # two chunk buffers, reused: a fresh tokens x vocab allocation per chunk costs as much as a pass over it
        logits_buf = hidden.new_empty(rows, weight.shape[0])
        logp_buf = torch.empty(rows, weight.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, n, rows):
            h, t = hidden[s:s + rows], targets[s:s + rows]
            m = len(t)
            logits = torch.matmul(h, weight.T, out=logits_buf[:m])
            logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=logp_buf[:m])  # one fused pass
            valid = t >= 0
            index = t.clamp(min=0)
            losses[s:s + m] = -logp.gather(1, index[:, None]).squeeze(1) * valid
            if need_hidden or need_weight:
                grad = logp.exp_()  # softmax, in place
                grad[torch.arange(m, device=grad.device), index] -= 1
                grad = grad.to(hidden.dtype)
                # ignored tokens: zero their rows on the narrow side (m x hidden), not the m x vocab gradient
                keep = valid[:, None].to(hidden.dtype)
                if need_hidden:
                    torch.matmul(grad, weight, out=grad_hidden[s:s + m]).mul_(keep)
                if need_weight:
                    grad_weight.add_((grad.T @ (h * keep)).float())
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
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # the matmuls below write into buffers (out=), which autocast skips
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    grad = torch.is_grad_enabled()
    need_hidden, need_weight = grad and hidden.requires_grad, grad and weight.requires_grad
    with torch.autocast(device, enabled=False):
        total, losses = _HeadCrossEntropy.apply(hidden, weight, targets, need_hidden, need_weight)
    return total, losses.view(shape)
