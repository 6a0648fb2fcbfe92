"""LoRA from scratch: low-rank adapters for frozen ``nn.Linear`` layers.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), §4.1:
a frozen weight W (out × in) is adapted as

    h = W x + b + scale · B (A (dropout(x)))        A: r × in,  B: out × r

with ``scale = alpha / r``, or ``alpha / sqrt(r)`` for rank-stabilised LoRA
(Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with
LoRA", 2023). As in ``loralib``, the ``lora_`` prefix *is* the adapter API:
freezing, the adapter state dict and saving all key off it.

QLoRA (Dettmers et al. 2023, §3) keeps the frozen base quantized (``loralab.quant``)
and the adapters in float32: ``LoRAConfig(quantize="nf4")``. DoRA and PiSSA change the
update and its start (``LoRAConfig(dora=True)``, ``init="pissa"``; ``loralab.variants``).
Many adapters on one base and saving them: ``loralab.adapters``.

This module depends on torch only.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from loralab.adapter_slots import AdapterSlots, LoRAAdapter
from loralab.lora_config import ALL_LINEAR, LoRAConfig
from loralab.quant import QuantizedLinear, quantization, quantize_linears, quantized_layers
from loralab.surgery import replace_module, tied_weights
from loralab.variants import direction_norm, dora_output, pissa_factors

OUTPUT_HEAD = "lm_head"  # never adapted by `all-linear`, as in PEFT
DEFAULT_ADAPTER = "default"  # the name inject_lora gives, as in PEFT


class LoRALinear(AdapterSlots, nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``scale · B A``.

    The base ``weight`` and ``bias`` are the wrapped layer's own parameters
    (same tensors, same state-dict keys), frozen. ``lora_B`` starts at zero, so
    a fresh layer computes exactly what the base computed. ``lora_A`` and
    ``lora_B`` are float32 under a bf16/fp16 base (as PEFT keeps them): the LoRA
    path runs in float32 and its result is cast back to the activation dtype.

    Two variants change the update. DoRA (``dora=True``) trains a magnitude per output
    and normalises the direction: W' = m ⊙ (W + scale·B A) / ‖W + scale·B A‖. PiSSA
    (``init="pissa"``) starts A, B at W's principal part and leaves the residual in W.

    A layer can hold several named adapters (one base, many tasks; ``AdapterSlots``):
    the active one's tensors are the layer's own ``lora_A`` / ``lora_B`` (loralib's keys).
    ``disabled = True`` computes the base alone (torchtune's switch).

    A ``QuantizedLinear`` base (QLoRA) stays packed in ``base_layer`` and computes
    W x + b itself (``weight`` and ``bias`` are None); its adapters are float32, and
    merging into it must say ``dequantize=True``.
    """

    def __init__(self, base: nn.Linear | QuantizedLinear, *, rank: int, alpha: float, dropout: float = 0.0,
                 scaling: str = "standard", init: str = "kaiming", dora: bool = False,
                 adapter_name: str = DEFAULT_ADAPTER):
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
        self.add_adapter(adapter_name, rank, alpha, dropout, scaling, init, dora)
        self.set_adapter(adapter_name)

    def base_weight(self) -> torch.Tensor:
        """The W this layer computes with (a quantized base's: its float32 dequantization)."""
        return self.weight if self.base_layer is None else self.base_layer.dequantize_weight()

    @torch.no_grad()
    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0,
                    scaling: str = "standard", init: str = "kaiming", dora: bool = False) -> None:
        """A new adapter, parked and frozen until ``set_adapter(name)``."""
        # float32 at least: bf16 cannot hold the small updates B receives early in training
        # (and a quantized base's integer codes promote to float32 too)
        base = self.weight if self.base_layer is None else next(self.base_layer.buffers())
        dtype = torch.promote_types(base.dtype, torch.float32)
        adapter = LoRAAdapter.initialised(self.in_features, self.out_features, rank, alpha, dropout, scaling, init,
                                          device=base.device, dtype=dtype)
        self.lora_parked[name] = adapter.requires_grad_(False)
        if init == "pissa":
            if self.base_layer is not None:
                raise ValueError("PiSSA needs a float base to take the SVD of, not a quantized one")
            A, B = pissa_factors(self.weight.to(dtype), rank, adapter.scale)
            adapter.lora_A.copy_(A)
            adapter.lora_B.copy_(B)
            self.leave_residual(name, A, B)
        if dora:  # DoRA §4.1: m starts at ‖W + scale·B A‖ (= ‖W‖ unless PiSSA), so W' = W at init
            weight = self.base_weight().to(dtype) + adapter.scale * adapter.lora_B @ adapter.lora_A
            adapter.lora_magnitude = nn.Parameter(weight.norm(dim=1), requires_grad=False)  # (out,)

    @torch.no_grad()
    def leave_residual(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """PiSSA: W becomes the residual W − scale · B A, and adapter ``name`` keeps A, B as
        its initial factors, which the saved adapter records (the base it applies to is
        the original W minus them)."""
        adapter = self.adapter(name)
        adapter.lora_A_init, adapter.lora_B_init = A.clone(), B.clone()
        self.weight.copy_((self.weight.to(A.dtype) - adapter.scale * B @ A).to(self.weight.dtype))

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
        if self.lora_magnitude is not None:
            return dora_output(self, x, result, lora)
        return (result + self.scale * lora).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale · B A, shape (out, in), in the adapter's dtype (float32, or float64 for a float64 base)."""
        return self.scale * (self.lora_B @ self.lora_A)

    def merged_weight(self) -> torch.Tensor:
        """W + scale · B A (DoRA: rescaled per output to the magnitude), summed in the
        adapter's dtype and cast to W's once (a quantized base's W is its float32 dequantization)."""
        weight = self.base_weight()
        return self._merged(weight.to(self.lora_A.dtype)).to(weight.dtype)

    def _merged(self, weight: torch.Tensor) -> torch.Tensor:
        merged = weight + self.delta_weight()
        if self.lora_magnitude is not None:
            merged = merged * (self.lora_magnitude / merged.norm(dim=1))[:, None]
        return merged

    def original_weight(self) -> torch.Tensor:
        """W before any adapter, in the adapter's dtype: the base's (PiSSA: the residual
        plus the principal part it gave the adapter)."""
        weight = self.base_weight().to(self.lora_A.dtype)
        return weight if self.lora_A_init is None else weight + self.scale * self.lora_B_init @ self.lora_A_init

    def effective_delta(self) -> torch.Tensor:
        """What the adapter adds to the original weight, whatever the variant: the merged
        weight minus ``original_weight()``, (out, in), of an unmerged layer."""
        if self.merged:
            raise RuntimeError("effective_delta needs an unmerged layer: call unmerge() first")
        return self._merged(self.base_weight().to(self.lora_A.dtype)) - self.original_weight()

    @torch.no_grad()
    def merge(self, safe: bool = False, dequantize: bool = False) -> None:
        """Fold the update into W. Idempotent. ``safe=True`` (PEFT's safe_merge) raises
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
        if self.lora_magnitude is not None:  # unmerge needs the norm of the W it cannot see then
            self.merged_norm = direction_norm(self, self.weight.to(self.lora_A.dtype))
        self.weight.copy_(merged)
        self.merged = True

    def dequantize_base(self) -> None:
        """Replace a quantized base by a float32 weight (and its bias), for good."""
        linear = self.base_layer.to_linear()
        self.weight, self.bias, self.base_layer = linear.weight, linear.bias, None

    def _unmerged_weight(self) -> torch.Tensor:
        """W as it was before ``merge``, in the adapter's dtype."""
        merged = self.weight.to(self.lora_A.dtype)
        if self.lora_magnitude is not None:
            merged = merged * (self.merged_norm / self.lora_magnitude)[:, None]
        return merged - self.delta_weight()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of W. Idempotent."""
        if self.merged:
            self.weight.copy_(self._unmerged_weight().to(self.weight.dtype))
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
    wrapped = {f"{name}.base_layer" for name in lora_modules(model)}
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


def inject_lora(model: nn.Module, config: LoRAConfig, adapter_name: str = DEFAULT_ADAPTER) -> list[str]:
    """Give the Linears ``config`` targets an adapter called ``adapter_name``, in place:
    each becomes a ``LoRALinear`` wrapping its frozen base.

    The model's first adapter is the active one, and everything else is frozen; a later
    adapter waits, frozen, until ``set_adapter(model, name)`` (``loralab.adapters``). The
    first adapter's ``config.quantize`` quantizes the base (QLoRA: every ``nn.Linear`` but
    ``lm_head``); a later one must name the same. Returns the names of the adapted modules.
    Raises before changing anything if the name is taken, the quantization differs, nothing
    matches, the rank is too large for a targeted layer, or a targeted weight is tied to
    another module (GPT-2's lm_head and wte).
    """
    require_new_adapter_name(model, adapter_name)
    require_unmerged(model, "adding an adapter")
    if pissa := variant_adapters(model, "pissa") or (adapter_names(model) if config.init == "pissa" else []):
        raise ValueError(f"LoRA init='pissa' leaves its residual in the base, so a PiSSA adapter is the model's "
                         f"only one: cannot add {adapter_name!r} beside {pissa}")
    _require_quantization(model, adapter_name, config.quantize)
    targets = _validated_targets(model, config)
    saved = modules_to_save(model, config.modules_to_save)
    if clash := sorted(set(targets) & set(saved)):
        raise ValueError(f"LoRA modules_to_save={config.modules_to_save!r} are also LoRA targets: {clash}")
    active = active_adapter(model) or adapter_name
    if active == adapter_name:
        quantize_linears(model, config.quantize)  # QLoRA quantizes the whole frozen base, not only the targets
        model.requires_grad_(False)
        for module in saved.values():  # trained in full beside the adapter
            module.requires_grad_(True)
    for target in targets:
        layer = model.get_submodule(target)
        if isinstance(layer, LoRALinear):
            layer.add_adapter(adapter_name, config.rank, config.alpha, config.dropout, config.scaling, config.init,
                              config.dora)
        else:
            layer = LoRALinear(layer, rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                               scaling=config.scaling, init=config.init, dora=config.dora, adapter_name=adapter_name)
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


def _require_quantization(model: nn.Module, name: str, quantize: str) -> None:
    """An adapter means something only on a base quantized the way its config says."""
    base = quantization(model)
    if not lora_modules(model) and base != "none":  # its config could not say how (block size, skip ...)
        raise ValueError(f"{type(model).__name__} is already quantized: give inject_lora the float model and "
                         f"LoRAConfig(quantize=...), and it quantizes the base itself")
    if lora_modules(model) and base != quantize:
        raise ValueError(f"adapter {name!r} has quantize={quantize!r}, but this model's base has quantize={base!r}: "
                         f"the adapters of one base share its quantization")


def _validated_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    targets = find_targets(model, config.target_modules)
    if not targets:
        raise ValueError(f"LoRA target_modules={config.target_modules!r} matched no nn.Linear in "
                         f"{type(model).__name__}; its Linear modules are: {linear_names(model)}")
    for name, tied in tied_weights(model, targets).items():
        # merging scale·B·A into a shared weight would change the other module too
        raise ValueError(f"LoRA cannot adapt {name!r}: its weight is tied to {tied}")
    for name in targets:
        layer = model.get_submodule(name)
        if config.rank > min(layer.in_features, layer.out_features):
            raise ValueError(f"LoRA rank={config.rank} is larger than min(in, out)="
                             f"{min(layer.in_features, layer.out_features)} of layer {name!r} "
                             f"({layer.in_features} -> {layer.out_features})")
    return targets


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The layers the active adapter adapts, by name."""
    return {name: m for name, m in lora_modules(model).items() if m.active_adapter is not None}


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
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
    for name, layer in lora_modules(model).items():
        replace_module(model, name, layer.to_linear(dequantize))
    if dequantize:
        for name, layer in quantized_layers(model).items():
            replace_module(model, name, layer.to_linear())
    return model


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter ``model`` holds, in the order its layers list them."""
    names: dict[str, None] = {}
    for layer in lora_modules(model).values():
        names.update(dict.fromkeys(layer.adapter_names))
    return list(names)


def active_adapter(model: nn.Module) -> str | None:
    """The adapter ``model`` computes with; None when it holds none."""
    return next((m.active_adapter for m in lora_modules(model).values() if m.active_adapter is not None), None)


def variant_adapters(model: nn.Module, variant: str | None = None) -> list[str]:
    """The adapters that are DoRA (``variant="dora"``) or PiSSA (``"pissa"``); both when None."""
    keys = {"dora": ("lora_magnitude",), "pissa": ("lora_A_init",), None: ("lora_magnitude", "lora_A_init")}[variant]
    return [name for name in adapter_names(model)
            if any(getattr(layer.adapter(name), key) is not None for layer in lora_modules(model).values()
                   if name in layer.adapter_names for key in keys)]


def require_new_adapter_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[\w-]+", name) or hasattr(nn.ModuleDict, name):
        raise ValueError(f"adapter name {name!r} is invalid: expected letters, digits, '_' or '-' "
                         f"(and not a method of nn.ModuleDict, such as 'keys')")
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists: choose another name, or delete_adapter(model, {name!r})")


def require_unmerged(model: nn.Module, doing: str) -> None:
    merged = [name for name, layer in lora_modules(model).items() if layer.merged]
    if merged:
        raise RuntimeError(f"{doing} needs an unmerged model: {merged[:3]} are merged; unmerge_lora(model) first")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; tied weights count once, a quantized weight as its out × in."""
    params = list(model.parameters())
    quantized = sum(m.in_features * m.out_features for m in quantized_layers(model).values())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized


def analytic_lora_parameters(model: nn.Module) -> int:
    """Σ r · (in + out) over the layers the active adapter adapts (+ out for DoRA's
    magnitude): what the adapter should add."""
    return sum(m.rank * (m.in_features + m.out_features) + (m.out_features if m.lora_magnitude is not None else 0)
               for m in lora_layers(model).values())
