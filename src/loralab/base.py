"""Where a run's base model comes from: a checkpoint, or our own pretraining, cached.

Pretraining happens once per distinct (model config, corpus, pretraining settings)
and is cached under ``cache_dir``; a file lock makes concurrent jobs of a sweep
wait for the first one instead of pretraining twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from loralab.model import GPT, GPTConfig

log = logging.getLogger(__name__)


def save_base(model: GPT, path: Path) -> None:
    """Weights and GPTConfig in one safetensors file, written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp), metadata={"gpt_config": json.dumps(asdict(model.config))})
    os.replace(tmp, path)


def load_base(path: str | Path) -> GPT:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "gpt_config" not in metadata:
        raise ValueError(f"{str(path)!r} is not a loralab base checkpoint (no gpt_config in its metadata)")
    model = GPT(GPTConfig(**json.loads(metadata["gpt_config"])))
    load_model(model, str(path))
    return model


def cache_key(model_config: GPTConfig, base_cfg: DictConfig, corpus_fingerprint: str) -> str:
    """Everything that determines a pretrained base, hashed."""
    settings = OmegaConf.to_container(base_cfg)
    settings.pop("checkpoint")
    blob = json.dumps({"model": asdict(model_config), "base": settings, "corpus": corpus_fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_base(model_config: GPTConfig, base_cfg: DictConfig, corpus_fingerprint: str, cache_dir: str | Path,
                pretrain) -> GPT:
    """The cached base for these settings, pretrained with ``pretrain()`` on a miss."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"base-{cache_key(model_config, base_cfg, corpus_fingerprint)}.safetensors"
    with FileLock(str(path) + ".lock"):
        if path.exists():
            log.info("Using the cached base model %s", path)
        else:
            log.info("No cached base model for these settings: pretraining one into %s", path)
            save_base(pretrain(), path)
    return load_base(path)
