"""Replacing a model's submodules in place, and the weight ties that forbid it.

This module depends on torch only.
"""

from __future__ import annotations

import torch.nn as nn


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``model``'s submodule ``name`` (e.g. ``transformer.h.0.attn.q_proj``) was."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, module)


def tied_weights(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """For each submodule in ``names`` whose ``weight`` another module shares (GPT-2's lm_head
    and wte), the other parameter names that hold it. Modules without a weight share nothing."""
    owners: dict[int, list[str]] = {}
    for param_name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(param_name)
    ties = {}
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)
        others = [n for n in owners.get(id(weight), []) if n != f"{name}.weight"] if weight is not None else []
        if others:
            ties[name] = others
    return ties
