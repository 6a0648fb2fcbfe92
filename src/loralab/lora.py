"""LoRA from scratch: low-rank adapters for frozen ``nn.Linear`` layers.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), §4.1:
a frozen weight W (out × in) is adapted as

    h = W x + b + scale · B (A (dropout(x)))        A: r × in,  B: out × r

with ``scale = alpha / r``, or ``alpha / sqrt(r)`` for rank-stabilised LoRA
(Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with
LoRA", 2023). As in ``loralib``, the ``lora_`` prefix *is* the adapter API:
freezing, the adapter state dict and saving all key off it.

This module depends on torch (and safetensors for saving) only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SCALINGS = ("standard", "rslora")
INITS = ("kaiming", "gaussian")
ALL_LINEAR = "all-linear"
OUTPUT_HEAD = "lm_head"  # never adapted by `all-linear`, as in PEFT
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoRAConfig:
    """What to adapt and how.

    ``target_modules`` is a list of leaf names (``["q_proj", "v_proj"]``), a
    regular expression matched against full module names (``r".*\\.h\\.0\\..*"``),
    or ``"all-linear"`` (every ``nn.Linear`` except ``lm_head``).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    scaling: str = "standard"
    init: str = "kaiming"

    def __post_init__(self):
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        _check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
               "rank", self.rank, "a positive integer")
        _check(isinstance(self.alpha, (int, float)) and self.alpha > 0, "alpha", self.alpha, "a number > 0")
        _check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
               "dropout", self.dropout, "a number in [0, 1)")
        _check(bool(self.target_modules), "target_modules", self.target_modules,
               "a non-empty list of module names, a regular expression, or 'all-linear'")
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"LoRA target_modules={self.target_modules!r} is not a valid regular expression: {e}")
        _check(self.scaling in SCALINGS, "scaling", self.scaling, f"one of {list(SCALINGS)}")
        _check(self.init in INITS, "init", self.init, f"one of {list(INITS)}")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.scaling)


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"LoRA {name}={value!r} is invalid: expected {allowed}")


def lora_scale(alpha: float, rank: int, scaling: str = "standard") -> float:
    """alpha / r (LoRA §4.1) or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(rank) if scaling == "rslora" else alpha / rank


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``scale · B A``.

    The base ``weight`` and ``bias`` are the wrapped layer's own parameters
    (same tensors, same state-dict keys), frozen. ``lora_B`` starts at zero, so
    a fresh layer computes exactly what the base computed.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 scaling: str = "standard", init: str = "kaiming"):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, scaling
        self.scale = lora_scale(alpha, rank, scaling)
        self.weight = base.weight.requires_grad_(False)
        self.bias = base.bias.requires_grad_(False) if base.bias is not None else None
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters(init)

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.rank)
        else:  # the initialisation nn.Linear (and loralib, PEFT) give A
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError("LoRALinear is merged: call unmerge() before training it "
                                   "(a merged layer has no separate LoRA path to train)")
            return F.linear(x, self.weight, self.bias)
        # (x Aᵀ) Bᵀ: never materialise the (out × in) product B A in training
        lora = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scale * lora

    def delta_weight(self) -> torch.Tensor:
        """scale · B A in float32, shape (out, in)."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold scale · B A into W (in float32, cast once). Idempotent."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take scale · B A back out of W. Idempotent."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged weight (for export)."""
        self.merge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, scaling={self.scaling}, merged={self.merged}")


# ---------------------------------------------------------------------------
# Model-level API


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def find_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the ``nn.Linear`` modules that ``target_modules`` selects."""
    names = linear_names(model)
    if target_modules == ALL_LINEAR:
        return [n for n in names if n.rsplit(".", 1)[-1] != OUTPUT_HEAD]
    if isinstance(target_modules, str):
        return [n for n in names if re.fullmatch(target_modules, n)]
    leaves = set(target_modules)
    return [n for n in names if n.rsplit(".", 1)[-1] in leaves]


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze ``model`` and wrap the targeted Linears in ``LoRALinear``, in place.

    Returns the names of the adapted modules. Raises before changing anything if
    nothing matches, the rank is too large for a targeted layer, or a targeted
    weight is tied to another module (GPT-2's lm_head and wte).
    """
    targets = find_targets(model, config.target_modules)
    if not targets:
        raise ValueError(f"LoRA target_modules={config.target_modules!r} matched no nn.Linear in "
                         f"{type(model).__name__}; its Linear modules are: {linear_names(model)}")
    owners: dict[int, list[str]] = {}
    for param_name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(param_name)
    for name in targets:
        layer = model.get_submodule(name)
        tied = [n for n in owners[id(layer.weight)] if n != f"{name}.weight"]
        if tied:  # merging scale·B·A into a shared weight would change the other module too
            raise ValueError(f"LoRA cannot adapt {name!r}: its weight is tied to {tied}")
        if config.rank > min(layer.in_features, layer.out_features):
            raise ValueError(f"LoRA rank={config.rank} is larger than min(in, out)="
                             f"{min(layer.in_features, layer.out_features)} of layer {name!r} "
                             f"({layer.in_features} -> {layer.out_features})")
    model.requires_grad_(False)
    for name in targets:
        replace_module(model, name, LoRALinear(model.get_submodule(name), config.rank, config.alpha,
                                               config.dropout, config.scaling, config.init))
    return targets


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``model``'s submodule ``name`` (e.g. ``transformer.h.0.attn.q_proj``) was."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` by a plain ``nn.Linear`` with the merged weight, in place."""
    for name, layer in lora_layers(model).items():
        replace_module(model, name, layer.to_linear())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load adapter weights; keys and shapes must match the model's adapters exactly."""
    expected = lora_state_dict(model)
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"adapter does not fit this model: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"adapter does not fit this model: {key} has shape {tuple(value.shape)}, "
                             f"the model expects {tuple(expected[key].shape)}")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise RuntimeError("unmerge the model before loading adapter weights into it")
    model.load_state_dict(state_dict, strict=False)


def save_adapter(model: nn.Module, config: LoRAConfig, directory: str | Path) -> Path:
    """Write the adapter alone: ``adapter.safetensors`` + ``adapter_config.json``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(tensors, directory / ADAPTER_WEIGHTS)
    meta = {"lora": asdict(config), "adapted_modules": sorted(lora_layers(model))}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_adapter(model: nn.Module, directory: str | Path) -> LoRAConfig:
    """Inject the saved adapter's LoRA into a fresh base ``model`` and load its weights."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = json.loads((directory / ADAPTER_CONFIG).read_text())
    config = LoRAConfig(**meta["lora"])
    inject_lora(model, config)
    load_lora_state_dict(model, load_file(directory / ADAPTER_WEIGHTS, device=str(next(model.parameters()).device)))
    return config


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; tied weights count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def analytic_lora_parameters(model: nn.Module) -> int:
    """Σ r · (in + out) over adapted layers: what LoRA should add."""
    return sum(m.rank * (m.in_features + m.out_features) for m in lora_layers(model).values())
