"""Minimal LoRA (Hu et al. 2021) in plain PyTorch: the baseline ELO is compared against.

`add_lora` swaps every targeted nn.Linear for a LoRALinear that keeps the frozen `weight` (and `bias`) under the
same names and adds `lora_A` (rank x in) and `lora_B` (out x rank, zero-initialised, so training starts from the base
model). `merge_lora_state` folds the adapters into the weights of a state dict: W + (alpha / rank) B A.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every linear of a layer


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT initialise A
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


def add_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = TARGETS) -> nn.Module:
    """Freeze `model` and add LoRA adapters to every decoder-layer linear named in `targets`, in place."""
    if rank < 1:
        raise ValueError(f"LoRA rank {rank}; expected a positive integer")
    model.requires_grad_(False)
    for layer in model.model.layers.values():
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))
    return model
