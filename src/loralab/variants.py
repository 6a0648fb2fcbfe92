"""What LoRA+, DoRA and PiSSA add to LoRA (``loralab.lora``): the optimizer groups,
DoRA's output and PiSSA's initial factors.

LoRA+ (Hayou et al., "LoRA+: Efficient Low Rank Adaptation of Large Models" (2024), §3:
B learns at λ times A's learning rate (λ = 16 in the paper). The groups are the
ones ``peft.optimizers.create_loraplus_optimizer`` builds, so a run compares with
PEFT's LoRA+ tensor for tensor: ``lora_B`` and every 1-D parameter (DoRA's
magnitude, biases, LayerNorm weights) at λ·lr, everything else at lr; weight decay
on all of them but biases and LayerNorm parameters.

DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", 2024, §4):
W' = m ⊙ (W + scale·B A) / ‖W + scale·B A‖, one trained magnitude per output.

PiSSA (Meng et al., "PiSSA: Principal Singular Values and Singular Vectors
Adaptation of Large Language Models", 2024, §3): A and B start at W's principal
part, and the frozen base keeps the residual.

This module depends on torch only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from loralab.lora import LoRALinear


def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0) -> list[dict]:
    """The trainable parameters of ``model`` as optimizer groups: A-like at ``lr``, B-like at
    ``ratio · lr`` (with and without weight decay). Empty groups are left out."""
    no_decay = {f"{name}.{key}" if name else key for name, module in model.named_modules()
                if isinstance(module, nn.LayerNorm) for key, _ in module.named_parameters(recurse=False)}
    groups = {"A": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name or p.ndim == 1:
            decays = name not in no_decay and "bias" not in name
            groups["B" if decays else "B_no_decay"].append(p)
        else:
            groups["A"].append(p)
    settings = {"A": (lr, weight_decay), "B": (ratio * lr, weight_decay), "B_no_decay": (ratio * lr, 0.0)}
    return [{"params": params, "lr": settings[key][0], "weight_decay": settings[key][1]}
            for key, params in groups.items() if params]


def pissa_factors(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA §3: W = U S Vᵀ, A = √(S_r/scale) V_rᵀ (r × in) and B = U_r √(S_r/scale)
    (out × r), so scale · B A is W's best rank-r approximation."""
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)  # (out, k), (k,), (k, in)
    root = (S[:rank] / scale).sqrt()  # (r,)
    return root[:, None] * Vh[:rank], U[:, :rank] * root  # (r, in), (out, r)


def dora_output(layer: LoRALinear, x: torch.Tensor, result: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
    """DoRA eq. 5 as PEFT computes it: (m / ‖W + scale·B A‖) ⊙ (W x + scale·B A x) + b, from
    the base's ``result`` (W x + b) and the LoRA path's ``lora`` (B A x) on the dropped-out ``x``."""
    weight = layer.base_weight().to(lora.dtype)
    factor = layer.lora_magnitude / direction_norm(layer, weight)  # (out,)
    if isinstance(layer.lora_dropout, nn.Identity):  # W x is in result already
        base = result.to(lora.dtype) - (layer.bias.to(lora.dtype) if layer.bias is not None else 0)
    else:  # PEFT's choice: the magnitude rescales W on the dropped-out input too
        base = F.linear(x, weight)  # (..., out)
    return (result + (factor - 1) * base + factor * layer.scale * lora).to(result.dtype)


@torch.no_grad()  # DoRA §4.3: the norm is a constant for the gradient, so this (out × in) sum holds no graph
def direction_norm(layer: LoRALinear, weight: torch.Tensor) -> torch.Tensor:
    """‖W + scale · B A‖ per output (one row of W each): DoRA's column norm, (out,)."""
    return (weight + layer.scale * layer.lora_B @ layer.lora_A).norm(dim=1)
