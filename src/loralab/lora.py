"""LoRA from scratch: low-rank adapters for frozen ``nn.Linear`` layers.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), §4.1:
a frozen weight W (out × in) is adapted as

    h = W x + b + scale · B (A (dropout(x)))        A: r × in,  B: out × r

with ``scale = alpha / r``, or ``alpha / sqrt(r)`` for rank-stabilised LoRA
(Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with
LoRA", 2023). As in ``loralib``, the ``lora_`` prefix *is* the adapter API:
freezing, the adapter state dict and saving all key off it.

QLoRA (Dettmers et al. 2023, §3) keeps the frozen base quantized (``loralab.quant``)
and the adapters in float32: ``LoRAConfig(quantize="nf4")``.

This module depends on torch (and safetensors for saving) only.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from loralab.quant import METHODS as QUANTIZE_METHODS
from loralab.quant import QuantizedLinear, quantization, quantize_linears, quantized_layers

SCALINGS = ("standard", "rslora")
INITS = ("kaiming", "gaussian")
ALL_LINEAR = "all-linear"
OUTPUT_HEAD = "lm_head"  # never adapted by `all-linear`, as in PEFT
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_ADAPTER = "default"  # the name inject_lora gives, as in PEFT


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

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.scaling)


def _require_field(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"LoRA {name}={value!r} is invalid: expected {allowed}")


def lora_scale(alpha: float, rank: int, scaling: str = "standard") -> float:
    """alpha / r (LoRA §4.1) or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(rank) if scaling == "rslora" else alpha / rank


class LoRAAdapter(nn.Module):
    """One named low-rank update ``scale · B A`` while it waits: ``lora_A`` (r × in),
    ``lora_B`` (out × r), its dropout and its scale. The active adapter's parts sit
    on the ``LoRALinear`` itself, under loralib's names."""

    def __init__(self, lora_A: nn.Parameter, lora_B: nn.Parameter, lora_dropout: nn.Module,
                 rank: int, alpha: float, scaling: str):
        super().__init__()
        self.lora_A, self.lora_B, self.lora_dropout = lora_A, lora_B, lora_dropout
        self.rank, self.alpha, self.scaling = rank, alpha, scaling
        self.scale = lora_scale(alpha, rank, scaling)

    @classmethod
    def initialised(cls, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                    scaling: str = "standard", init: str = "kaiming", **factory) -> LoRAAdapter:
        """A fresh adapter: A random, B zero, so it starts as no change at all (LoRA §4.1)."""
        lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        if init == "gaussian":
            nn.init.normal_(lora_A, std=1 / rank)
        else:  # the initialisation nn.Linear (and loralib, PEFT) give A
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        dropout_layer = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        return cls(lora_A, lora_B, dropout_layer, rank, alpha, scaling)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``scale · B A``.

    The base ``weight`` and ``bias`` are the wrapped layer's own parameters
    (same tensors, same state-dict keys), frozen. ``lora_B`` starts at zero, so
    a fresh layer computes exactly what the base computed. ``lora_A`` and
    ``lora_B`` are float32 under a bf16/fp16 base (as PEFT keeps them): the LoRA
    path runs in float32 and its result is cast back to the activation dtype.

    A layer can hold several named adapters (one base, many tasks). The active
    one is the layer's own ``lora_A`` / ``lora_B`` / ``lora_dropout`` / ``rank`` /
    ``alpha`` / ``scale``, so a single-adapter layer keeps loralib's keys; the
    others wait, frozen, in ``lora_parked[name]``. ``set_adapter`` swaps the
    parameter objects, it never copies values. ``disabled = True`` computes the
    base alone (torchtune's switch).

    A ``QuantizedLinear`` base (QLoRA) stays packed in ``base_layer`` and computes
    W x + b itself (``weight`` and ``bias`` are None); its adapters are float32, and
    merging into it must say ``dequantize=True``.
    """

    def __init__(self, base: nn.Linear | QuantizedLinear, rank: int, alpha: float, dropout: float = 0.0,
                 scaling: str = "standard", init: str = "kaiming", adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, QuantizedLinear):
            self.base_layer, self.weight, self.bias = base, None, None
        else:
            self.base_layer = None
            self.weight = base.weight.requires_grad_(False)
            self.bias = base.bias.requires_grad_(False) if base.bias is not None else None
        self.lora_parked = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged = False
        self.disabled = False
        self.add_adapter(adapter_name, rank, alpha, dropout, scaling, init)
        self.set_adapter(adapter_name)

    @property
    def adapter_names(self) -> list[str]:
        return ([self.active_adapter] if self.active_adapter is not None else []) + list(self.lora_parked)

    def adapter(self, name: str) -> LoRALinear | LoRAAdapter:
        """What holds adapter ``name``'s lora_A, lora_B and scale: the layer itself when it is active."""
        return self if name == self.active_adapter else self.lora_parked[name]

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0,
                    scaling: str = "standard", init: str = "kaiming") -> None:
        """A new adapter, parked and frozen until ``set_adapter(name)``."""
        # float32 at least: bf16 cannot hold the small updates B receives early in training
        # (and a quantized base's integer codes promote to float32 too)
        base = self.weight if self.base_layer is None else next(self.base_layer.buffers())
        dtype = torch.promote_types(base.dtype, torch.float32)
        adapter = LoRAAdapter.initialised(self.in_features, self.out_features, rank, alpha, dropout, scaling, init,
                                          device=base.device, dtype=dtype)
        self.lora_parked[name] = adapter.requires_grad_(False)

    def set_adapter(self, name: str | None) -> None:
        """Compute with adapter ``name`` (trainable; the others frozen, as in PEFT), or with
        none when ``name`` is None or an adapter this layer does not hold."""
        if name == self.active_adapter:
            return
        if self.merged:
            raise RuntimeError("LoRALinear is merged: call unmerge() before switching adapters")
        if self.active_adapter is not None:
            self.lora_parked[self.active_adapter] = LoRAAdapter(
                self.lora_A, self.lora_B, self.lora_dropout, self.rank, self.alpha, self.scaling).requires_grad_(False)
            self._empty_slot()
        if name in self.lora_parked:
            adapter = self.lora_parked.pop(name).requires_grad_(True)
            self.lora_A, self.lora_B, self.lora_dropout = adapter.lora_A, adapter.lora_B, adapter.lora_dropout
            self.rank, self.alpha = adapter.rank, adapter.alpha
            self.scaling, self.scale = adapter.scaling, adapter.scale
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if name == self.active_adapter:
            if self.merged:
                raise RuntimeError("LoRALinear is merged: call unmerge() before deleting its active adapter")
            self._empty_slot()
        else:
            del self.lora_parked[name]

    def _empty_slot(self) -> None:
        del self.lora_A, self.lora_B, self.lora_dropout
        self.rank = self.alpha = self.scaling = self.scale = self.active_adapter = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x) if self.base_layer is not None else F.linear(x, self.weight, self.bias)
        if self.merged:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError("LoRALinear is merged: call unmerge() before training it "
                                   "(a merged layer has no separate LoRA path to train)")
            return result
        if self.disabled or self.active_adapter is None:
            return result
        x = self.lora_dropout(x.to(self.lora_A.dtype))  # float32 under a bf16/fp16 base
        # (x Aᵀ) Bᵀ: never materialise the (out × in) product B A in training
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., out)
        return (result + self.scale * lora).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale · B A, shape (out, in), in the adapter's dtype (float32, or float64 for a float64 base)."""
        return self.scale * (self.lora_B @ self.lora_A)

    def merged_weight(self) -> torch.Tensor:
        """W + scale · B A, summed in the adapter's dtype and cast to W's once (a quantized
        base's W is its float32 dequantization)."""
        delta = self.delta_weight()
        weight = self.weight if self.base_layer is None else self.base_layer.dequantize_weight()
        return (weight.to(delta.dtype) + delta).to(weight.dtype)

    @torch.no_grad()
    def merge(self, safe: bool = False, dequantize: bool = False) -> None:
        """Fold scale · B A into W. Idempotent. ``safe=True`` (PEFT's safe_merge) raises
        before writing if the merged weight would hold NaN or inf, and leaves W as it was.

        A quantized base has no float W to fold into: ``dequantize=True`` replaces it, for
        good, by its float32 dequantization and merges into that (``unmerge`` leaves the
        float32 W); without it, this raises."""
        if self.base_layer is not None and not dequantize:
            raise RuntimeError(f"LoRALinear cannot merge into its {self.base_layer.method}-quantized base: "
                               f"merge(dequantize=True) dequantizes the base to float32 and merges into it "
                               f"(the layer then stays full precision)")
        if self.merged or self.active_adapter is None:
            return
        merged = self.merged_weight()
        if safe:
            _require_finite_merge(merged, self.active_adapter, f"Linear({self.in_features} -> {self.out_features})")
        if self.base_layer is not None:
            self.dequantize_base()
        self.weight.copy_(merged)
        self.merged = True

    def dequantize_base(self) -> None:
        """Replace a quantized base by a float32 weight (and its bias), for good."""
        linear = self.base_layer.to_linear()
        self.weight, self.bias, self.base_layer = linear.weight, linear.bias, None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take scale · B A back out of W. Idempotent."""
        if self.merged:
            delta = self.delta_weight()
            self.weight.copy_((self.weight.to(delta.dtype) - delta).to(self.weight.dtype))
            self.merged = False

    def to_linear(self, dequantize: bool = False) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged weight (for export); the base when no adapter
        is active. A quantized base needs ``dequantize=True`` (see ``merge``)."""
        self.merge(dequantize=dequantize)
        if self.base_layer is not None:  # no active adapter merged it: dequantize the base alone
            self.dequantize_base()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        parked = f", parked={list(self.lora_parked)}" if self.lora_parked else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, scaling={self.scaling}, merged={self.merged}, "
                f"active_adapter={self.active_adapter!r}{parked}")


def _require_finite_merge(merged: torch.Tensor, adapter: str, where: str) -> None:
    if not torch.isfinite(merged).all():
        raise ValueError(f"merging LoRA adapter {adapter!r} into {where} gives NaN/inf weights: "
                         f"nothing was merged (check that adapter's lora_A and lora_B)")


# ---------------------------------------------------------------------------
# Model-level API


def linear_names(model: nn.Module) -> list[str]:
    """The Linears LoRA can target: plain ``nn.Linear``s, ``QuantizedLinear``s, and ``LoRALinear``s
    (another adapter), but not the quantized base inside a ``LoRALinear``."""
    wrapped = {f"{name}.base_layer" for name in _lora_modules(model)}
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, QuantizedLinear, LoRALinear)) and name not in wrapped]


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
    """Freeze ``model`` and wrap the targeted Linears in ``LoRALinear``, in place: the
    model's adapter ``"default"``. With ``config.quantize`` (QLoRA) every ``nn.Linear`` but
    ``lm_head`` is quantized first. Returns the names of the adapted modules (see ``add_adapter``)."""
    return add_adapter(model, DEFAULT_ADAPTER, config)


def add_adapter(model: nn.Module, name: str, config: LoRAConfig) -> list[str]:
    """Give the Linears ``config`` targets an adapter called ``name``, in place.

    The model's first adapter is the active one, and everything else is frozen; a later
    adapter waits, frozen, until ``set_adapter(model, name)``. The first adapter's
    ``config.quantize`` quantizes the base (QLoRA: every ``nn.Linear`` but ``lm_head``); a
    later one must name the same. Returns the names of the adapted modules. Raises before
    changing anything if the name is taken, the quantization differs, nothing matches, the
    rank is too large for a targeted layer, or a targeted weight is tied to another module
    (GPT-2's lm_head and wte).
    """
    _require_new_name(model, name)
    _require_unmerged(model, "adding an adapter")
    _require_quantization(model, name, config.quantize)
    targets = _validated_targets(model, config)
    saved = modules_to_save(model, config.modules_to_save)
    if clash := sorted(set(targets) & set(saved)):
        raise ValueError(f"LoRA modules_to_save={config.modules_to_save!r} are also LoRA targets: {clash}")
    active = active_adapter(model) or name
    if active == name:
        quantize_linears(model, config.quantize)  # QLoRA quantizes the whole frozen base, not only the targets
        model.requires_grad_(False)
        for module in saved.values():  # trained in full beside the adapter
            module.requires_grad_(True)
    for target in targets:
        layer = model.get_submodule(target)
        if isinstance(layer, LoRALinear):
            layer.add_adapter(name, config.rank, config.alpha, config.dropout, config.scaling, config.init)
        else:
            layer = LoRALinear(layer, config.rank, config.alpha, config.dropout, config.scaling, config.init, name)
            replace_module(model, target, layer)
        layer.set_adapter(active)
    return targets


def modules_to_save(model: nn.Module, leaves: list[str]) -> dict[str, nn.Module]:
    """The modules whose leaf name is in ``leaves``, by full name; ValueError for a leaf that
    names none. They are shared by all adapters of a model: loading an adapter overwrites them."""
    found = {name: m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in leaves}
    if missing := sorted(set(leaves) - {name.rsplit(".", 1)[-1] for name in found}):
        raise ValueError(f"LoRA modules_to_save={leaves!r}: {missing} name no module of {type(model).__name__}")
    return found


def _saved_state_dict(model: nn.Module, config: LoRAConfig) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.detach() for name, module in modules_to_save(model, config.modules_to_save).items()
            for key, value in module.state_dict().items()}


def _require_quantization(model: nn.Module, name: str, quantize: str) -> None:
    """An adapter means something only on a base quantized the way its config says."""
    base = quantization(model)
    if not _lora_modules(model) and base != "none":  # its config could not say how (block size, skip ...)
        raise ValueError(f"{type(model).__name__} is already quantized: give inject_lora the float model and "
                         f"LoRAConfig(quantize=...), and it quantizes the base itself")
    if _lora_modules(model) and base != quantize:
        raise ValueError(f"adapter {name!r} has quantize={quantize!r}, but this model's base has quantize={base!r}: "
                         f"the adapters of one base share its quantization")


def _validated_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    targets = find_targets(model, config.target_modules)
    if not targets:
        raise ValueError(f"LoRA target_modules={config.target_modules!r} matched no nn.Linear in "
                         f"{type(model).__name__}; its Linear modules are: {linear_names(model)}")
    owners: dict[int, list[str]] = {}
    for param_name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(param_name)
    for name in targets:
        layer = model.get_submodule(name)
        weight = getattr(layer, "weight", None)  # None: a quantized base (quantize_linears refuses tied ones)
        tied = [n for n in owners[id(weight)] if n != f"{name}.weight"] if weight is not None else []
        if tied:  # merging scale·B·A into a shared weight would change the other module too
            raise ValueError(f"LoRA cannot adapt {name!r}: its weight is tied to {tied}")
        if config.rank > min(layer.in_features, layer.out_features):
            raise ValueError(f"LoRA rank={config.rank} is larger than min(in, out)="
                             f"{min(layer.in_features, layer.out_features)} of layer {name!r} "
                             f"({layer.in_features} -> {layer.out_features})")
    return targets


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``model``'s submodule ``name`` (e.g. ``transformer.h.0.attn.q_proj``) was."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The layers the active adapter adapts, by name."""
    return {name: m for name, m in _lora_modules(model).items() if m.active_adapter is not None}


def _lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear``, whatever adapters it holds."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module, safe: bool = False, dequantize: bool = False) -> None:
    """Fold the active adapter into the base weights. ``safe=True`` checks every merged
    weight for NaN/inf before writing any (PEFT's safe_merge); to merge another adapter,
    ``set_adapter`` it first. A quantized base needs ``dequantize=True``: the adapted
    layers then hold float32 weights for good (``LoRALinear.merge``)."""
    layers = lora_layers(model)
    if safe:
        for name, layer in layers.items():
            if not layer.merged:
                _require_finite_merge(layer.merged_weight(), layer.active_adapter, repr(name))
    for layer in layers.values():
        layer.merge(dequantize=dequantize)


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Replace every ``LoRALinear`` by a plain ``nn.Linear`` with the active adapter merged, in place
    (other adapters are dropped). A quantized base needs ``dequantize=True``, and then every
    ``QuantizedLinear``, adapted or not, becomes a float32 ``nn.Linear``: a plain float model."""
    for name, layer in _lora_modules(model).items():
        replace_module(model, name, layer.to_linear(dequantize))
    if dequantize:
        for name, layer in quantized_layers(model).items():
            replace_module(model, name, layer.to_linear())
    return model


# ---------------------------------------------------------------------------
# Many adapters, one base: PEFT's names (set_adapter, disable_adapter, delete_adapter)


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter ``model`` holds, in the order its layers list them."""
    names: dict[str, None] = {}
    for layer in _lora_modules(model).values():
        names.update(dict.fromkeys(layer.adapter_names))
    return list(names)


def active_adapter(model: nn.Module) -> str | None:
    """The adapter ``model`` computes with; None when it holds none."""
    return next((m.active_adapter for m in _lora_modules(model).values() if m.active_adapter is not None), None)


def set_adapter(model: nn.Module, name: str) -> None:
    """Compute and train with adapter ``name``; the others stay, frozen. Exact: parameters
    are swapped, not copied, so each adapter computes what it computes alone."""
    _require_adapter(model, name)
    _require_unmerged(model, "switching adapters")
    for layer in _lora_modules(model).values():
        layer.set_adapter(name)


@contextmanager
def disable_adapter(model: nn.Module):
    """``with disable_adapter(model): ...`` computes the base alone, exactly."""
    _require_unmerged(model, "disabling the adapters")
    layers = list(_lora_modules(model).values())
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, disabled in zip(layers, before):
            layer.disabled = disabled


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and its parameters, in place. A Linear left with no adapter
    becomes its frozen base again (``nn.Linear`` or ``QuantizedLinear``). The active
    adapter can be deleted only when it is the last one: ``set_adapter`` another first."""
    _require_adapter(model, name)
    others = [n for n in adapter_names(model) if n != name]
    if name == active_adapter(model) and others:
        raise ValueError(f"adapter {name!r} is active: set_adapter(model, one of {others}) before deleting it")
    _require_unmerged(model, "deleting an adapter")
    for module_name, layer in _lora_modules(model).items():
        if name in layer.adapter_names:
            layer.delete_adapter(name)
        if not layer.adapter_names:
            replace_module(model, module_name, layer.to_linear() if layer.base_layer is None else layer.base_layer)


@torch.no_grad()
def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], name: str) -> list[str]:
    """Add adapter ``name`` with ΔW = Σᵢ wᵢ · scaleᵢ · Bᵢ Aᵢ, exactly ("adapter arithmetic").

    A sum of rank-rᵢ updates has rank up to Σ rᵢ, so in general no adapter of a smaller
    rank holds it. Stacking does: A = [A₁; A₂; ...] (Σr × in) and B = [w₁·scale₁·B₁, w₂·scale₂·B₂, ...]
    (out × Σr) give B A = Σᵢ wᵢ · scaleᵢ · Bᵢ Aᵢ, and the new adapter's scale is 1
    (alpha = rank = Σ rᵢ). A layer that holds only some of ``adapters`` gets the sum of
    those. The new adapter waits, frozen, like any added one. Returns the layers it adapts.
    """
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"add_weighted_adapter needs one weight per adapter: got adapters={adapters}, "
                         f"weights={weights}")
    for adapter in adapters:
        _require_adapter(model, adapter)
    _require_new_name(model, name)
    _require_unmerged(model, "combining adapters")
    adapted = []
    for module_name, layer in _lora_modules(model).items():
        parts = [(w, layer.adapter(a)) for a, w in zip(adapters, weights) if a in layer.adapter_names]
        if not parts:
            continue
        A = torch.cat([part.lora_A for _, part in parts])  # (Σr, in)
        B = torch.cat([w * part.scale * part.lora_B for w, part in parts], dim=1)  # (out, Σr)
        layer.add_adapter(name, rank=A.shape[0], alpha=A.shape[0])
        layer.adapter(name).lora_A.copy_(A)
        layer.adapter(name).lora_B.copy_(B)
        adapted.append(module_name)
    return adapted


def _require_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[\w-]+", name) or hasattr(nn.ModuleDict, name):
        raise ValueError(f"adapter name {name!r} is invalid: expected letters, digits, '_' or '-' "
                         f"(and not a method of nn.ModuleDict, such as 'keys')")
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists: choose another name, or delete_adapter(model, {name!r})")


def _require_adapter(model: nn.Module, name: str) -> None:
    if name not in adapter_names(model):
        raise ValueError(f"no adapter {name!r} in this model: it holds {adapter_names(model)}")


def _require_unmerged(model: nn.Module, doing: str) -> None:
    merged = [name for name, layer in _lora_modules(model).items() if layer.merged]
    if merged:
        raise RuntimeError(f"{doing} needs an unmerged model: {merged[:3]} are merged; unmerge_lora(model) first")


# ---------------------------------------------------------------------------
# Saving and loading adapters


def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s weights (default: the active one's), under loralib's keys
    (``...q_proj.lora_A``) whether it is active or parked."""
    name = adapter_name or active_adapter(model)
    return {f"{module_name}.{key}": getattr(layer.adapter(name), key).detach()
            for module_name, layer in _lora_modules(model).items() if name in layer.adapter_names
            for key in ("lora_A", "lora_B")}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor],
                         adapter_name: str | None = None) -> None:
    """Load adapter weights into adapter ``adapter_name`` (default: the active one); keys and
    shapes must match that adapter's exactly."""
    expected = lora_state_dict(model, adapter_name)
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"adapter does not fit this model: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"adapter does not fit this model: {key} has shape {tuple(value.shape)}, "
                             f"the model expects {tuple(expected[key].shape)}")
    if any(layer.merged for layer in _lora_modules(model).values()):
        raise RuntimeError("unmerge the model before loading adapter weights into it")
    for key, value in state_dict.items():
        expected[key].copy_(value)  # the detached tensors share the parameters' storage


def save_adapter(model: nn.Module, config: LoRAConfig, directory: str | Path, base: dict | None = None) -> Path:
    """Write the active adapter alone: ``adapter.safetensors`` + ``adapter_config.json``.
    ``base`` (e.g. ``{"kind": ..., "sha256": ...}``) records the base it was trained on."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {**lora_state_dict(model), **_saved_state_dict(model, config)}
    tensors = {k: v.contiguous().cpu() for k, v in weights.items()}
    save_file(tensors, directory / ADAPTER_WEIGHTS)
    meta = {"lora": asdict(config), "adapted_modules": sorted(lora_layers(model))}
    if base is not None:
        meta["base"] = base
    (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_adapter(model: nn.Module, directory: str | Path, name: str | None = None,
                 expected_base_sha256: str | None = None) -> LoRAConfig:
    """Add the adapter saved in ``directory`` to ``model`` as adapter ``name`` (default
    ``"default"``) and load its weights; on a base without LoRA it becomes the active one.

    With ``expected_base_sha256``, an adapter that records a different base fails before
    anything changes; one that records none (an unknown base) loads.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = json.loads((directory / ADAPTER_CONFIG).read_text())
    _require_same_base(meta.get("base"), expected_base_sha256, directory)
    config = LoRAConfig(**meta["lora"])
    name = name or DEFAULT_ADAPTER
    weights = load_file(directory / ADAPTER_WEIGHTS, device=str(next(model.parameters()).device))
    saved = _saved_state_dict(model, config)
    add_adapter(model, name, config)
    try:
        load_lora_state_dict(model, {k: v for k, v in weights.items() if k not in saved}, name)
        load_saved_modules(saved, weights)
    except ValueError:
        delete_adapter(model, name)  # leave the model with the adapters it had
        raise
    return config


@torch.no_grad()
def load_saved_modules(saved: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    """Copy the modules_to_save weights of an adapter file into the model's tensors ``saved``."""
    for key, tensor in saved.items():  # all checked before any is changed
        if key not in weights or weights[key].shape != tensor.shape:
            raise ValueError(f"adapter does not fit this model: modules_to_save weight {key} is missing or has "
                             f"another shape than {tuple(tensor.shape)}")
    for key, tensor in saved.items():
        tensor.copy_(weights[key])


def _require_same_base(recorded: dict | None, expected_sha256: str | None, directory: Path) -> None:
    """An adapter means something only on the base it was trained on."""
    recorded_sha256 = (recorded or {}).get("sha256")
    if expected_sha256 is not None and recorded_sha256 is not None and recorded_sha256 != expected_sha256:
        raise ValueError(f"adapter {directory} was trained on base {recorded.get('kind', '')} "
                         f"sha256={recorded_sha256}, "
                         f"not on this base (sha256={expected_sha256}): load it onto the base it was trained on")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; tied weights count once, a quantized weight as its out × in."""
    params = list(model.parameters())
    quantized = sum(m.in_features * m.out_features for m in quantized_layers(model).values())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized


def analytic_lora_parameters(model: nn.Module) -> int:
    """Σ r · (in + out) over the layers the active adapter adapts: what LoRA should add."""
    return sum(m.rank * (m.in_features + m.out_features) for m in lora_layers(model).values())
