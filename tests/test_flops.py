"""The analytic FLOP count (behind MFU and the benchmarks' FLOP bounds) equals what PyTorch's own FLOP counter
sees in one forward + backward, for every training mode.

torch.utils.flop_counter counts every matrix multiply (linears, the fused head + loss and LoRA as `mm`), so those must
agree to the FLOP. Attention runs through SDPA's math backend here, whose batched matmuls (`bmm`) the counter sees
over the full T x T scores; that figure is scaled to the causal average ((T + 1) / 2 keys per query instead of T),
as the analytic count has it, before comparing.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import elo
from elo.train.flops import train_flops_per_token
from elo.lora import add_lora

SEQ = 24


def counted(model: torch.nn.Module) -> tuple[int, int]:
    """(matmul FLOPs, attention FLOPs) of one training step's forward + backward, by PyTorch's counter."""
    ids = torch.randint(0, model.config.vocab_size, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(ids[:, :-1], targets=ids[:, 1:])[0].backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(by_op) <= {"aten.mm", "aten.addmm", "aten.bmm"}, by_op
    return by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0), by_op.get("aten.bmm", 0)


def setup(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "full":
        return model
    if mode == "lora":
        return add_lora(model, rank=4, alpha=8)
    if mode in ("elo", "elo+middle", "elo+distilled"):
        sub = elo.detach(model, [1, 4])
        sub.requires_grad_(False)
        sub.model.layers.requires_grad_(True)
        ids = torch.randint(0, model.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(1))
        if mode == "elo+middle":  # the fitted surrogate of layers 2-3, frozen, between the two trained layers
            elo.attach_middle(sub, elo.fit_middle(model, [1, 4], ids.split(2), tokens=100))
        if mode == "elo+distilled":  # two frozen decoder blocks (layers 2 and 3 as they are) in their place
            elo.attach_middle(sub, elo.distill_middle(model, [1, 4], ids.split(2), tokens=100, blocks=2, steps=0))
        return sub
    model.requires_grad_(False)  # "frozen": layers 2 and 3 of 4 train inside the full graph
    for i in ("1", "2"):
        model.model.layers[i].requires_grad_(True)
    return model


@pytest.mark.parametrize("mode", ["full", "lora", "elo", "elo+middle", "elo+distilled", "frozen"])
def test_analytic_flops_equal_pytorch_flop_counter(tiny, mode):
    _, directory, _ = tiny
    model = setup(elo.load_model(directory), mode)
    matmul, attention = counted(model)
    assert matmul > 0 and attention > 0
    expected = matmul + attention * (SEQ + 1) / (2 * SEQ)
    assert train_flops_per_token(model, SEQ) * 2 * SEQ == pytest.approx(expected, rel=1e-9)


def test_elo_bound_on_a_smollm2_shaped_model():
    """SmolLM2-135M shape at seq 512: full fine-tuning costs 6 FLOPs per weight, ELO 6 per weight of its two layers
    and 4 per weight of the frozen head (forward + input gradient), giving the 5.40x bound quoted in issue 3."""
    config = elo.ModelConfig.from_hf({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True})
    with torch.device("meta"):  # shapes only
        full, sub = elo.Transformer(config), elo.Transformer(config)
    for i in range(1, 29):  # the ELO graph: layers 1 and 30 (indices 0 and 29), embedding, norm and head frozen
        del sub.model.layers[str(i)]
    sub.requires_grad_(False)
    sub.model.layers.requires_grad_(True)
    assert train_flops_per_token(full, 512) / train_flops_per_token(sub, 512) == pytest.approx(5.40, abs=0.005)


def test_peak_memory_is_per_stage():
    """The pipeline runs stages in one process: a later stage's peak must not be an earlier one's."""
    from elo.train.metrics import StepTimer

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs: the peak cannot be reset on this OS")
    cpu = torch.device("cpu")
    big = torch.ones(64 * 2**20)  # 256 MB, touched
    del big
    before = StepTimer.peak_memory_gb(cpu)
    StepTimer.reset_peak_memory(cpu)
    after = StepTimer.peak_memory_gb(cpu)
    assert after < before - 0.2, (before, after)
