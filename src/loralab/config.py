"""Validate a composed run config before any work starts.

Every problem becomes one ``ConfigError`` line that names the key, the bad value
and what is allowed. Hydra prints a ``CompactHydraException`` as that line alone,
without a traceback.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import fields
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from loralab.data import CORPORA, ByteTokenizer
from loralab.lora import LoRAConfig, inject_lora
from loralab.model import GPT, GPTConfig

LOGGERS = ("wandb", "csv", "tensorboard", "none")
WANDB_MODES = ("auto", "offline", "online", "disabled")
KEYS = {
    "": {"model", "lora", "data", "base", "optim", "trainer", "logger", "seed", "paths", "merge_tolerance"},
    "model": {f.name for f in fields(GPTConfig)} | {"pretrained"},
    "lora": {f.name for f in fields(LoRAConfig)} | {"enabled"},
    "data": {"corpus", "batch_size", "val_fraction", "max_bytes", "train_path", "val_path"},
    "base": {"checkpoint", "corpus", "max_bytes", "val_fraction", "batch_size", "steps", "lr", "warmup_steps", "seed"},
    "optim": {"lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio"},
    "trainer": set(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "logger", "callbacks"},
    "logger": {"name", "project", "entity", "mode"},
    "paths": {"output_dir", "cache_dir"},
}


class ConfigError(CompactHydraException, ValueError):
    pass


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first unknown key, missing value or bad value."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"config value {sorted(missing)[0]} is required but not set (add {sorted(missing)[0]}=...)")
    for section, allowed in KEYS.items():
        node = cfg if not section else cfg[section]
        unknown = sorted(set(node) - allowed - {"hydra"})
        if unknown:
            where = f"{section}.{unknown[0]}" if section else unknown[0]
            raise ConfigError(f"unknown config key {where!r}: allowed keys are {sorted(allowed)}")
    model_config = _check("model", lambda: gpt_config(cfg.model))
    _require(bool(cfg.model.pretrained) or model_config.vocab_size >= ByteTokenizer.vocab_size, "model.vocab_size",
             model_config.vocab_size, f"at least {ByteTokenizer.vocab_size} for the byte tokenizer")
    lora_config = _check("lora", lambda: lora_config_of(cfg.lora))
    if lora_config is not None and not cfg.model.pretrained:
        with torch.device("meta"):  # rank against the real layer shapes, at no cost
            _check("lora", lambda: inject_lora(GPT(model_config), lora_config))
    _check_data(cfg.data, "data")
    _check_data(cfg.base, "base")
    _require(cfg.base.checkpoint is None or Path(cfg.base.checkpoint).is_file(), "base.checkpoint",
             cfg.base.checkpoint, "an existing base.safetensors file (or null to pretrain)")
    _require(cfg.model.pretrained is None or Path(cfg.model.pretrained).is_dir(), "model.pretrained",
             cfg.model.pretrained, "an existing Hugging Face GPT-2 directory (or null)")
    _positive_int(cfg.base.steps, "base.steps")
    _positive(cfg.base.lr, "base.lr")
    _positive(cfg.optim.lr, "optim.lr")
    _require(cfg.optim.weight_decay >= 0, "optim.weight_decay", cfg.optim.weight_decay, "a number >= 0")
    _require(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", cfg.optim.min_lr_ratio, "a number in [0, 1]")
    _require(isinstance(cfg.optim.warmup_steps, int) and cfg.optim.warmup_steps >= 0, "optim.warmup_steps",
             cfg.optim.warmup_steps, "an integer >= 0")
    _positive_int(cfg.trainer.max_steps, "trainer.max_steps")
    _require(cfg.logger.name in LOGGERS, "logger.name", cfg.logger.name, f"one of {list(LOGGERS)}")
    if cfg.logger.name == "tensorboard":
        _require(importlib.util.find_spec("tensorboard") is not None, "logger", "tensorboard",
                 "an installed logger: `pip install tensorboard` first (or choose logger=csv)")
    if cfg.logger.name == "wandb":
        _require(cfg.logger.mode in WANDB_MODES, "logger.mode", cfg.logger.mode, f"one of {list(WANDB_MODES)}")
    _positive(cfg.merge_tolerance, "merge_tolerance")


def gpt_config(model_cfg: DictConfig) -> GPTConfig:
    return GPTConfig(**{k: v for k, v in model_cfg.items() if k != "pretrained"})


def lora_config_of(lora_cfg: DictConfig) -> LoRAConfig | None:
    """The LoRAConfig a ``lora`` section describes, or None for full fine-tuning."""
    if not lora_cfg.enabled:
        return None
    values = OmegaConf.to_container(lora_cfg, resolve=True)
    values.pop("enabled")
    return LoRAConfig(**values)


def _check(section: str, build):
    try:
        return build()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{section}: {e}") from None


def _check_data(node: DictConfig, section: str) -> None:
    _require(node.corpus in CORPORA, f"{section}.corpus", node.corpus, f"one of {list(CORPORA)}")
    _positive_int(node.batch_size, f"{section}.batch_size")
    _require(0 < node.val_fraction < 1, f"{section}.val_fraction", node.val_fraction, "a number in (0, 1)")
    _require(node.max_bytes is None or (isinstance(node.max_bytes, int) and node.max_bytes > 0),
             f"{section}.max_bytes", node.max_bytes, "a positive integer or null")
    for key in ("train_path", "val_path"):
        path = node.get(key)
        _require(path is None or Path(path).expanduser().is_file(), f"{section}.{key}", path, "an existing text file")


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed}")


def _positive(value, key: str) -> None:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, key, value, "a number > 0")


def _positive_int(value, key: str) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, key, value, "a positive integer")
