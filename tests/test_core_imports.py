"""The torch-only core imports none of the framework around it: a reader can take the LoRA
layer and its adapters, the models, quantization and the analyses into their own project."""

import subprocess
import sys

CORE = ["loralab.lora", "loralab.adapter_slots", "loralab.lora_config", "loralab.variants", "loralab.adapters",
        "loralab.surgery", "loralab.model", "loralab.vit", "loralab.quant", "loralab.analysis", "loralab.schedule",
        "loralab.packed"]
FRAMEWORK = ["pytorch_lightning", "lightning", "lightning_fabric", "hydra", "omegaconf", "wandb", "torchmetrics"]


def framework_imported_by(modules: list[str]) -> list[str]:
    """The framework packages in sys.modules after importing ``modules`` in a fresh
    interpreter (in this one, other tests have imported them already)."""
    probe = (f"import sys; import {', '.join(modules)}; "
             f"print(' '.join(m for m in {FRAMEWORK!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_the_core_imports_no_framework():
    assert framework_imported_by(CORE) == []


def test_the_probe_sees_a_framework_import():
    assert framework_imported_by(["json", "omegaconf"]) == ["omegaconf"]
