"""LoRA+'s optimizer parameter groups.

Hayou et al., "LoRA+: Efficient Low Rank Adaptation of Large Models" (2024), §3:
B learns at λ times A's learning rate (λ = 16 in the paper). The groups are the
ones ``peft.optimizers.create_loraplus_optimizer`` builds, so a run compares with
PEFT's LoRA+ tensor for tensor: ``lora_B`` and every 1-D parameter (DoRA's
magnitude, biases, LayerNorm weights) at λ·lr, everything else at lr; weight decay
on all of them but biases and LayerNorm parameters.

This module depends on torch only.
"""

from __future__ import annotations

import torch.nn as nn


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
