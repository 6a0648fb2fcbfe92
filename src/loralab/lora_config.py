"""What LoRA adapts and how: ``LoRAConfig``, and the scale alpha / r (LoRA §4.1) or
alpha / sqrt(r) (rsLoRA). Checked on construction, one line per bad field.

This module depends on torch only (through ``loralab.quant``'s method names).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from loralab.quant import METHODS as QUANTIZE_METHODS

SCALINGS = ("standard", "rslora")
INITS = ("kaiming", "gaussian", "pissa")
ALL_LINEAR = "all-linear"


@dataclass
class LoRAConfig:
    """What to adapt and how.

    ``target_modules`` is a list of leaf names (``["q_proj", "v_proj"]``), a
    regular expression matched against full module names (``r".*\\.h\\.0\\..*"``),
    or ``"all-linear"`` (every ``nn.Linear`` except ``lm_head``). ``quantize`` (``int8`` or
    ``nf4``) stores the frozen base's Linears quantized (QLoRA; see ``loralab.quant``).
    ``modules_to_save`` (PEFT's name) are modules trained in full beside the adapters, by
    leaf name (a new classification ``head``); their weights are saved with the adapter.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    scaling: str = "standard"
    init: str = "kaiming"
    quantize: str = "none"
    modules_to_save: list[str] = field(default_factory=list)
    dora: bool = False

    def __post_init__(self):
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save)
        _require_field(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
                       "rank", self.rank, "a positive integer")
        _require_field(isinstance(self.alpha, (int, float)) and 0 < self.alpha < math.inf, "alpha", self.alpha,
                       "a finite number > 0")
        _require_field(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
                       "dropout", self.dropout, "a number in [0, 1)")
        _require_field(bool(self.target_modules), "target_modules", self.target_modules,
                       "a non-empty list of module names, a regular expression, or 'all-linear'")
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"LoRA target_modules={self.target_modules!r} is not a valid regular expression: "
                                 f"{e}") from None
        _require_field(self.scaling in SCALINGS, "scaling", self.scaling, f"one of {list(SCALINGS)}")
        _require_field(self.init in INITS, "init", self.init, f"one of {list(INITS)}")
        _require_field(self.quantize in QUANTIZE_METHODS, "quantize", self.quantize,
                       f"one of {list(QUANTIZE_METHODS)}")
        _require_field(isinstance(self.dora, bool), "dora", self.dora, "true or false")
        _require_field(self.init != "pissa" or self.quantize == "none", "init", self.init,
                       f"kaiming or gaussian with quantize={self.quantize!r} (PiSSA's SVD needs the float base)")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.scaling)


def _require_field(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"LoRA {name}={value!r} is invalid: expected {allowed}")


def lora_scale(alpha: float, rank: int, scaling: str = "standard") -> float:
    """alpha / r (LoRA §4.1) or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(rank) if scaling == "rslora" else alpha / rank
