"""The fused head + cross-entropy equals logits -> F.cross_entropy, in value and gradients."""
import pytest
import torch
import torch.nn.functional as F

from elo import loss as fused


@pytest.mark.parametrize("weight_trains", [True, False])
def test_fused_head_loss_matches_reference(monkeypatch, weight_trains):
    monkeypatch.setattr(fused, "CHUNK_ROWS", 7)  # several chunks, the last one partial
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 10, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=weight_trains)
    targets = torch.randint(0, 50, (3, 10), generator=g)
    targets[0, :4] = -100  # ignored positions (e.g. prompt tokens in SFT)

    total, per_token = fused.head_cross_entropy(hidden, weight, targets)
    (2.5 * total).backward()
    grads = hidden.grad.clone(), weight.grad.clone() if weight_trains else None
    hidden.grad = weight.grad = None

    ref_tokens = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), reduction="none",
                                 ignore_index=-100).view(3, 10)
    (2.5 * ref_tokens.sum()).backward()
    assert torch.allclose(per_token, ref_tokens, atol=1e-5) and per_token[0, :4].eq(0).all()
    assert torch.allclose(total, ref_tokens.sum(), atol=1e-4)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-5)
    if weight_trains:
        assert torch.allclose(grads[1], weight.grad, atol=1e-5)


def test_no_gradient_work_without_grad():
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    with torch.no_grad():
        total, _ = fused.head_cross_entropy(hidden, weight, torch.randint(0, 20, (4,)))
    assert not total.requires_grad


def test_model_loss_equals_logits_loss(tiny_llama):
    import elo

    model = elo.load_model(tiny_llama[0])
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    total, per_token = model(ids[:, :-1], targets=ids[:, 1:])
    ref = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    assert torch.allclose(total, ref, rtol=1e-5)


def test_fused_head_loss_bf16(monkeypatch):
    """bf16 hidden states and head: log-softmax and losses in fp32, gradients in bf16, as the reference computes."""
    monkeypatch.setattr(fused, "CHUNK_ROWS", 5)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 16, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(40, 16, generator=g).bfloat16()
    targets = torch.randint(0, 40, (12,), generator=g)
    total, per_token = fused.head_cross_entropy(hidden, weight, targets)
    total.backward()
    grad, hidden.grad = hidden.grad.clone(), None
    ref = F.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")
    ref.sum().backward()
    assert per_token.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert torch.allclose(per_token, ref, atol=1e-5)
    assert torch.allclose(grad.float(), hidden.grad.float(), atol=1e-2)


def test_fused_head_loss_follows_autocast():
    """Under autocast the head runs in the autocast dtype, as `hidden @ weight.T` would (the chunked matmuls write
    into buffers, which autocast alone would skip); gradients reach the fp32 leaves in fp32."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 32, generator=g, requires_grad=True)
    weight = torch.randn(300, 32, generator=g, requires_grad=True)
    targets = torch.randint(0, 300, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, per_token = fused.head_cross_entropy(hidden, weight, targets)
        ref = F.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")
    total.backward()
    grads, hidden.grad, weight.grad = (hidden.grad, weight.grad), None, None
    ref.sum().backward()
    fp32 = F.cross_entropy(hidden.detach() @ weight.detach().T, targets, reduction="none")
    assert (ref - fp32).abs().max() > 1e-2  # bf16 logits are visibly not fp32 ones, so the next line means something
    assert torch.allclose(per_token, ref, atol=1e-6)
    assert grads[0].dtype == grads[1].dtype == torch.float32
    assert torch.allclose(grads[0], hidden.grad, atol=2e-2) and torch.allclose(grads[1], weight.grad, atol=2e-2)
