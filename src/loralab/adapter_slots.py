"""One layer, many named adapters: the slots a ``LoRALinear`` keeps them in.

The active adapter's tensors sit on the layer itself (``lora_A``, ``lora_B``, ...,
``rank``, ``alpha``, ``scale``), so a single-adapter layer keeps loralib's state-dict
keys; the others wait, frozen, as ``LoRAAdapter``s in ``lora_parked[name]`` (PEFT's
multi-adapter layer). Switching swaps the parameter objects, it never copies values.

This module depends on torch only.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from loralab.lora_config import lora_scale

TRAINED = ("lora_A", "lora_B", "lora_magnitude")  # an adapter's parameters (lora_magnitude: DoRA only)
FROZEN = ("lora_A_init", "lora_B_init")  # PiSSA only


class LoRAAdapter(nn.Module):
    """One named update while it waits: ``lora_A`` (r × in), ``lora_B`` (out × r), its
    dropout and scale; DoRA's trained magnitude ``lora_magnitude`` (out,); PiSSA's initial
    factors ``lora_A_init`` / ``lora_B_init`` (frozen buffers: the principal part the base
    gave up). The active adapter's parts sit on the ``LoRALinear`` itself, under these names."""

    def __init__(self, rank: int, alpha: float, scaling: str, lora_dropout: nn.Module, **tensors: torch.Tensor | None):
        super().__init__()
        self.rank, self.alpha, self.scaling = rank, alpha, scaling
        self.scale = lora_scale(alpha, rank, scaling)
        self.lora_dropout = lora_dropout
        for key in TRAINED:
            setattr(self, key, tensors.get(key))
        for key in FROZEN:
            self.register_buffer(key, tensors.get(key))

    @classmethod
    def initialised(cls, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                    scaling: str = "standard", init: str = "kaiming", **factory) -> LoRAAdapter:
        """A fresh adapter: A random, B zero, so it starts as no change at all (LoRA §4.1).
        (PiSSA replaces both from the base's SVD: ``LoRALinear.add_adapter``.)"""
        lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        if init == "gaussian":
            nn.init.normal_(lora_A, std=1 / rank)
        else:  # the initialisation nn.Linear (and loralib, PEFT) give A
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        dropout_layer = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        return cls(rank, alpha, scaling, dropout_layer, lora_A=lora_A, lora_B=lora_B)


class AdapterSlots:
    """The adapter bookkeeping of an ``nn.Module`` layer with ``lora_parked`` (an ``nn.ModuleDict``),
    ``active_adapter``, ``merged`` and ``weight`` (``LoRALinear``)."""

    @property
    def adapter_names(self) -> list[str]:
        return ([self.active_adapter] if self.active_adapter is not None else []) + list(self.lora_parked)

    def adapter(self, name: str) -> AdapterSlots | LoRAAdapter:
        """What holds adapter ``name``'s lora_A, lora_B and scale: the layer itself when it is active."""
        return self if name == self.active_adapter else self.lora_parked[name]

    def set_adapter(self, name: str | None) -> None:
        """Compute with adapter ``name`` (trainable; the others frozen, as in PEFT), or with
        none when ``name`` is None or an adapter this layer does not hold."""
        if name == self.active_adapter:
            return
        if self.merged:
            raise RuntimeError("LoRALinear is merged: call unmerge() before switching adapters")
        if self.active_adapter is not None:
            tensors = {key: getattr(self, key) for key in TRAINED + FROZEN}
            self.lora_parked[self.active_adapter] = LoRAAdapter(
                self.rank, self.alpha, self.scaling, self.lora_dropout, **tensors).requires_grad_(False)
            self._empty_slot()
        if name in self.lora_parked:
            adapter = self.lora_parked.pop(name).requires_grad_(True)
            for key in TRAINED:
                setattr(self, key, getattr(adapter, key))
            for key in FROZEN:
                self.register_buffer(key, getattr(adapter, key))
            self.lora_dropout = adapter.lora_dropout
            self.rank, self.alpha = adapter.rank, adapter.alpha
            self.scaling, self.scale = adapter.scaling, adapter.scale
            self.active_adapter = name

    @torch.no_grad()
    def delete_adapter(self, name: str) -> None:
        adapter = self.adapter(name)
        if adapter.lora_A_init is not None:  # PiSSA: give W its principal part back
            self.weight.add_((adapter.scale * adapter.lora_B_init @ adapter.lora_A_init).to(self.weight.dtype))
        if name == self.active_adapter:
            if self.merged:
                raise RuntimeError("LoRALinear is merged: call unmerge() before deleting its active adapter")
            self._empty_slot()
        else:
            del self.lora_parked[name]

    def _empty_slot(self) -> None:
        for key in TRAINED + FROZEN + ("lora_dropout",):
            delattr(self, key)
        self.rank = self.alpha = self.scaling = self.scale = self.active_adapter = None
