"""Analytic training FLOPs per token (the numerator of MFU; the peak is in elo.train.metrics).

Counted per token: 2 FLOPs per multiply-add of every matrix multiply in the forward pass (linears and causal
attention); in the backward pass 2 more for an input gradient where something upstream trains, and 2 more for a
weight gradient where the weight trains. So full fine-tuning costs 6 per weight, a frozen layer above a trained one 4,
a frozen layer below every trained one 2 (forward only), and ELO's two layers plus the frozen head
(6 * layers + 4 * head) instead of 6 * everything. A middle-layer surrogate counts as what it is: the linear one
(elo.extensions.middle) a frozen d x d linear, the distilled one (elo.extensions.distill) frozen decoder blocks: 4 per
weight above a trained layer, plus their attention core.
"""
from __future__ import annotations

from torch import nn

from elo.lora import LoRALinear
from elo.model import FrozenAffine, MiddleBlocks


def _trains(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters())


def _linear(m: nn.Module, input_grad: bool) -> float:
    out_f, in_f = m.weight.shape
    f = 2 * in_f * out_f  # one matrix multiply: forward, input gradient and weight gradient each cost this
    total = f + (f if input_grad else 0) + (f if m.weight.requires_grad else 0)
    if isinstance(m, LoRALinear):  # x -> A -> B: both forward, both weight gradients, B's input gradient always
        a, b = 2 * m.lora_A.shape[0] * in_f, 2 * out_f * m.lora_A.shape[0]
        total += 2 * (a + b) + b + (a if input_grad else 0)
    return total


def _decoder_layer(layer: nn.Module, upstream: bool, attn_core: float) -> tuple[float, bool]:
    """FLOPs of one decoder layer (or a frozen block standing in for some) and whether anything up to its output
    trains."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [[attn.q_proj, attn.k_proj, attn.v_proj], "core", [attn.o_proj], [mlp.gate_proj, mlp.up_proj],
              [mlp.down_proj]]
    upstream = upstream or _trains(layer.input_layernorm)
    total = 0.0
    for group in groups:
        if group == "core":
            total += attn_core * (3 if upstream else 1)
            continue
        total += sum(_linear(m, upstream) for m in group)
        upstream = upstream or any(_trains(m) for m in group)
        if group[0] is attn.o_proj:
            upstream = upstream or _trains(layer.post_attention_layernorm)
    return total, upstream


def train_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """FLOPs to train on one token of a `seq_len` sequence, given which parameters of `model` require grad."""
    cfg = model.config
    upstream = model.model.embed_tokens.weight.requires_grad  # does anything before this point train?
    total = 0.0
    attn_core = 2 * 2 * (seq_len + 1) / 2 * cfg.num_attention_heads * cfg.head_dim  # QK^T and AV, causal average
    middle = model.middle if model.middle is not None else {}
    for key, layer in model.model.layers.items():
        stand_in = middle[key] if key in middle else None  # the surrogate feeding this layer
        if isinstance(stand_in, FrozenAffine):
            total += _linear(stand_in, upstream)
        elif isinstance(stand_in, MiddleBlocks):
            for block in stand_in.blocks:
                flops, upstream = _decoder_layer(block, upstream, attn_core)
                total += flops
        flops, upstream = _decoder_layer(layer, upstream, attn_core)
        total += flops
    return total + _linear(model.lm_head, upstream)
