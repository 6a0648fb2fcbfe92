"""Many adapters on one base, and adapters on disk.

PEFT's model-level names for one frozen base holding several LoRA adapters
(``set_adapter``, ``disable_adapter``, ``delete_adapter``, ``add_weighted_adapter``);
a second adapter is added with ``inject_lora(model, config, adapter_name=...)``.
Saving and loading write and read one adapter alone (``adapter.safetensors`` +
``adapter_config.json``), with the base it was trained on.

This module depends on torch (and safetensors for saving) only.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn

from loralab.adapter_slots import FROZEN, TRAINED
from loralab.files import atomic_path
from loralab.lora import (
    DEFAULT_ADAPTER,
    LoRAConfig,
    active_adapter,
    adapter_names,
    inject_lora,
    lora_layers,
    lora_modules,
    modules_to_save,
    require_new_adapter_name,
    require_unmerged,
    variant_adapters,
)
from loralab.surgery import replace_module

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def set_adapter(model: nn.Module, name: str) -> None:
    """Compute and train with adapter ``name``; the others stay, frozen. Exact: parameters
    are swapped, not copied, so each adapter computes what it computes alone."""
    _require_adapter(model, name)
    require_unmerged(model, "switching adapters")
    for layer in lora_modules(model).values():
        layer.set_adapter(name)


@contextmanager
def disable_adapter(model: nn.Module):
    """``with disable_adapter(model): ...`` computes the base alone, exactly."""
    require_unmerged(model, "disabling the adapters")
    layers = list(lora_modules(model).values())
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
    require_unmerged(model, "deleting an adapter")
    for module_name, layer in lora_modules(model).items():
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
    if variants := [a for a in adapters if a in variant_adapters(model)]:
        raise ValueError(f"add_weighted_adapter sums plain LoRA updates scale·B·A: {variants} are DoRA or PiSSA "
                         f"adapters, whose updates are not")
    require_new_adapter_name(model, name)
    require_unmerged(model, "combining adapters")
    adapted = []
    for module_name, layer in lora_modules(model).items():
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

def _require_adapter(model: nn.Module, name: str) -> None:
    if name not in adapter_names(model):
        raise ValueError(f"no adapter {name!r} in this model: it holds {adapter_names(model)}")

# ---------------------------------------------------------------------------
# Saving and loading adapters


def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s weights (default: the active one's), under loralib's keys
    (``...q_proj.lora_A``) whether it is active or parked; DoRA adds ``lora_magnitude``,
    PiSSA its initial factors ``lora_A_init`` / ``lora_B_init``."""
    name = adapter_name or active_adapter(model)
    return {f"{module_name}.{key}": getattr(layer.adapter(name), key).detach()
            for module_name, layer in lora_modules(model).items() if name in layer.adapter_names
            for key in TRAINED + FROZEN if getattr(layer.adapter(name), key) is not None}


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
    if any(layer.merged for layer in lora_modules(model).values()):
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
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, tmp)
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
    # PiSSA: the base becomes the residual of the recorded factors, not of a new SVD
    inject_lora(model, replace(config, init="kaiming") if config.init == "pissa" else config, adapter_name=name)
    try:
        if config.init == "pissa":
            _leave_recorded_residual(model, name, weights)
        load_lora_state_dict(model, {k: v for k, v in weights.items() if k not in saved}, name)
        load_saved_modules(saved, weights)
    except ValueError:
        delete_adapter(model, name)  # leave the model with the adapters it had
        raise
    return config


def _leave_recorded_residual(model: nn.Module, name: str, weights: dict[str, torch.Tensor]) -> None:
    layers = lora_modules(model)
    keys = {module_name: [f"{module_name}.lora_A_init", f"{module_name}.lora_B_init"] for module_name in layers}
    if missing := [key for pair in keys.values() for key in pair if key not in weights]:
        raise ValueError(f"adapter does not fit this model: a PiSSA adapter needs {missing[:4]}")
    for module_name, layer in layers.items():
        layer.leave_residual(name, *(weights[key].to(layer.lora_A.dtype) for key in keys[module_name]))


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


def _saved_state_dict(model: nn.Module, config: LoRAConfig) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.detach() for name, module in modules_to_save(model, config.modules_to_save).items()
            for key, value in module.state_dict().items()}


class AdapterFileError(ValueError):
    """An adapter directory that cannot be what a run saved for this model: a file missing,
    truncated or not JSON, a config that is not a LoRAConfig, or weights with other keys or
    shapes than that config gives this model."""


def load_adapter_files(model: nn.Module, directory: str | Path, **load_args) -> LoRAConfig:
    """``load_adapter``, with every way the directory's files can be wrong as one
    AdapterFileError naming the directory (the model keeps the adapters it had)."""
    from safetensors import SafetensorError

    try:
        return load_adapter(model, directory, **load_args)
    except (OSError, ValueError, TypeError, KeyError, SafetensorError) as e:
        raise AdapterFileError(f"adapter {directory} does not load: {type(e).__name__}: {e}") from None


def non_finite_weights(model: nn.Module) -> list[str]:
    """The active adapter's weights that hold a NaN or an inf (a diverged run's)."""
    return [key for key, value in lora_state_dict(model).items() if not torch.isfinite(value).all()]
