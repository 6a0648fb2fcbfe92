"""The devices of this machine and the precisions they run: what the config check
(``trainer.accelerator``, ``trainer.precision``) and a run's provenance ask about the
hardware. Lightning is imported only inside the functions that ask it."""

from __future__ import annotations

import importlib.util

import torch


def available_accelerators() -> list[str]:
    return ["auto", "cpu"] + [name for name in ("cuda", "gpu", "mps") if device_kind(name) is not None]


def device_kind(accelerator: str) -> str | None:
    """``cpu``, ``cuda`` or ``mps``: what ``accelerator`` runs on here; None when this machine has
    no such device (Lightning's ``gpu`` is CUDA, else MPS; ``auto`` falls back to the CPU)."""
    from pytorch_lightning.accelerators import CUDAAccelerator, MPSAccelerator

    present = [kind for kind, acc in (("cuda", CUDAAccelerator), ("mps", MPSAccelerator)) if acc.is_available()]
    if accelerator == "cpu":
        return "cpu"
    if accelerator == "auto":
        return (present + ["cpu"])[0]
    if accelerator == "gpu":
        return present[0] if present else None
    return accelerator if accelerator in present else None


def device_name(kind: str | None) -> str | None:
    """``cpu``, ``mps``, or the CUDA device's name (e.g. ``NVIDIA H100 80GB HBM3``)."""
    if kind == "cuda":
        return torch.cuda.get_device_name(0)
    return kind


def unified_precision(precision) -> str:
    """Lightning's own name for ``precision`` (16 -> 16-mixed, bf16 -> bf16-mixed); ValueError
    naming the allowed values for anything Lightning does not accept."""
    from lightning_fabric.connector import _convert_precision_to_unified_args

    return _convert_precision_to_unified_args(precision)


def precision_problem(precision: str, device: str) -> str | None:
    """Why ``device`` would not run ``precision`` as configured, or None."""
    if precision.startswith("transformer-engine") and (device != "cuda"
                                                        or importlib.util.find_spec("transformer_engine") is None):
        return "transformer-engine needs a CUDA GPU and the transformer_engine package"
    if device == "cpu" and precision == "16-mixed":
        return "AMP with float16 does not exist on the CPU: Lightning would run bf16-mixed instead"
    if device == "cuda" and precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16"
    if device == "mps" and precision == "64-true":
        return "MPS has no float64"
    return None
