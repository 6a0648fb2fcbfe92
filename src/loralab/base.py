"""Where a run's base model comes from: a checkpoint, or our own pretraining, cached.

Pretraining happens once per distinct (model config, corpus, pretraining settings)
and is cached under ``cache_dir``; a file lock makes concurrent jobs of a sweep
wait for the first one instead of pretraining twice. Every base file carries the
SHA-256 of its weights: a load verifies it, so a damaged cache entry is pretrained
again instead of silently giving a run a different base. A run records its base's
identity (``BaseIdentity``) so its adapter can only ever be put back on that base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from loralab.files import atomic_path
from loralab.model import GPT, GPTConfig
from loralab.model_kinds import KINDS, build_model, kind_of
from loralab.vit import ViT, ViTConfig

log = logging.getLogger(__name__)

# the metadata key a base file stores its config under -> its model kind
CONFIG_KEYS = {kind.metadata_key: kind for kind in KINDS.values()}


class BaseError(ValueError):
    """A base model file that is missing, damaged or not ours; the message says which and what to do."""


@dataclass
class BaseIdentity:
    """Which base a run started from: ``source`` is ``cache``, ``checkpoint`` or ``gpt2``
    (a Hugging Face directory), ``path`` is absolute, ``sha256`` hashes the weights."""

    source: str
    path: str
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the model's weights: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_base(model: GPT | ViT, path: str | Path) -> str:
    """Weights, config (GPTConfig or ViTConfig) and the weights' SHA-256 in one safetensors
    file, written atomically; returns the hash."""
    sha256 = weights_sha256(model)
    metadata = {kind_of(model).metadata_key: json.dumps(asdict(model.config)), "sha256": sha256}
    with atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata=metadata)
    return sha256


def read_base_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a loralab base file, reading its header only (cheap: no weights);
    BaseError if it is not a readable safetensors file with a ``gpt_config``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # a truncated or overwritten file: safetensors cannot read its header
        raise BaseError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if not metadata.keys() & CONFIG_KEYS.keys():
        raise BaseError(f"{path} is not a loralab base checkpoint (no model config in its metadata)")
    return metadata


def config_of_base(metadata: dict[str, str]) -> GPTConfig | ViTConfig:
    """The model config a base file's metadata holds."""
    (key,) = metadata.keys() & CONFIG_KEYS.keys()
    return CONFIG_KEYS[key].config_class(**json.loads(metadata[key]))


def load_base(path: str | Path) -> tuple[GPT | ViT, str]:
    """The base model in ``path`` and its weights' SHA-256, verified; BaseError if the file
    is not a loralab base or its weights are not the ones it was saved with."""
    metadata = read_base_metadata(path)
    model = build_model(config_of_base(metadata))
    try:
        load_model(model, str(path))
    except Exception as e:
        raise BaseError(f"{path} is damaged: its weights cannot be read ({type(e).__name__}: {e})") from None
    sha256 = weights_sha256(model)
    if metadata.get("sha256", sha256) != sha256:
        raise BaseError(f"{path} is damaged: its weights hash to {sha256[:12]}…, not the {metadata['sha256'][:12]}… "
                        "they were saved with")
    return model, sha256


def cache_key(model_config: GPTConfig | ViTConfig, base_cfg: DictConfig, corpus_fingerprint: str) -> str:
    """Everything that determines a pretrained base, hashed."""
    settings = OmegaConf.to_container(base_cfg)
    settings.pop("checkpoint")
    blob = json.dumps({"model": asdict(model_config), "base": settings, "corpus": corpus_fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_base(model_config: GPTConfig | ViTConfig, base_cfg: DictConfig, corpus_fingerprint: str,
                cache_dir: str | Path, pretrain) -> tuple[GPT | ViT, BaseIdentity]:
    """The cached base for these settings, pretrained with ``pretrain(checkpoint_dir)`` on a
    miss or when the cached file is damaged. Pretraining checkpoints into
    ``base-<key>.ckpt-dir`` beside the base file, so a killed pretraining goes on from
    there (under the same lock); the directory goes once the base is saved."""
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"base-{cache_key(model_config, base_cfg, corpus_fingerprint)}.safetensors"
    checkpoint_dir = path.with_suffix(".ckpt-dir")
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                model, sha256 = load_base(path)
                log.info("Using the cached base model %s", path)
                return model, BaseIdentity("cache", str(path), sha256)
            except BaseError as e:
                log.warning("%s; pretraining it again", e)
        else:
            log.info("No cached base model for these settings: pretraining one into %s", path)
        save_base(pretrain(checkpoint_dir), path)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        model, sha256 = load_base(path)  # what every later job will load, bit for bit
    return model, BaseIdentity("cache", str(path), sha256)


def load_recorded_base(identity: dict) -> GPT:
    """Exactly the base a run recorded (``BaseIdentity.to_dict()``), verified by its hash;
    BaseError naming the base when it is missing or different. Never pretrains."""
    from loralab.gpt2 import load_gpt2

    path, sha256 = Path(identity["path"]), identity["sha256"]
    if not path.exists():
        raise BaseError(f"the base this run was trained on is missing: {path} ({identity['source']}, "
                        f"sha256 {sha256[:12]}…)")
    if identity["source"] == "gpt2":
        model = load_gpt2(path)
        found = weights_sha256(model)
    else:
        model, found = load_base(path)
    if found != sha256:
        raise BaseError(f"{path} is not the base this run was trained on: its weights hash to {found[:12]}…, "
                        f"the run recorded {sha256[:12]}…")
    return model
