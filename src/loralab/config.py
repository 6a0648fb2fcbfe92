"""Check a composed run config before any work starts.

Hydra checks keys and types against the schema (``loralab.schema``) while it
composes; this module checks what only code can: ranks against the real layer
shapes, regular expressions that match, files that exist, numbers in range.
Every problem is one line naming the key, the bad value and what is allowed, and
``validate`` reports all of them at once. Hydra prints a ``CompactHydraException``
without a traceback.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import typing
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from loralab.data import CORPORA, ByteTokenizer
from loralab.lora import LoRAConfig, inject_lora
from loralab.model import GPT, GPTConfig
from loralab.schema import TrainConfig

LOGGERS = ("wandb", "csv", "tensorboard", "none")
WANDB_MODES = ("auto", "offline", "online", "disabled")
# Trainer arguments loralab sets itself (loralab.run.fit); a config cannot override them
OWN_TRAINER_ARGS = {"logger", "callbacks", "check_val_every_n_epoch", "num_sanity_val_steps", "inference_mode",
                    "enable_checkpointing", "enable_model_summary", "default_root_dir"}
TRAINER_ARGS = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"} - OWN_TRAINER_ARGS


class ConfigError(CompactHydraException, ValueError):
    pass


class Problems:
    """The config's problems, one line each, collected so that all are reported at once."""

    def __init__(self):
        self.lines: list[str] = []

    def require(self, ok: bool, key: str, value, allowed: str) -> None:
        if not ok:
            self.lines.append(f"{key}={value!r} is invalid: expected {allowed}")

    def build(self, section: str, make):
        """``make()``'s result, or None with its error recorded under ``section``."""
        try:
            return make()
        except (TypeError, ValueError) as e:
            self.lines.append(f"{section}: {e}")
            return None

    def number(self, value, key: str, low: float = 0.0, high: float = math.inf, low_open: bool = True) -> None:
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = finite and (value > low if low_open else value >= low) and value <= high
        if high < math.inf:
            allowed = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
        else:
            allowed = f"a finite number {'>' if low_open else '>='} {low:g}"
        self.require(ok, key, value, allowed)

    def positive_int(self, value, key: str) -> None:
        self.require(isinstance(value, int) and not isinstance(value, bool) and value > 0, key, value,
                     "a positive integer")


def validate(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every problem of ``cfg``, one line each."""
    problems = Problems()
    missing = sorted(OmegaConf.missing_keys(cfg))
    for key in missing:
        problems.lines.append(f"config value {key} is required but not set (add {key}=...)")
    problems.lines += [f"unknown config key {key!r}: {where} has no such key (see `python train.py --cfg job`)"
                       for key, where in unknown_keys(cfg)]
    if not missing:
        check_model_and_lora(cfg, problems)
        check_data(cfg.data, "data", problems)
        check_data(cfg.base, "base", problems)
        check_training(cfg, problems)
    if problems.lines:
        raise ConfigError("\n".join(problems.lines))


def unknown_keys(cfg: DictConfig, schema: type = TrainConfig, prefix: str = "") -> list[tuple[str, str]]:
    """(key, section) for each key of ``cfg`` its schema does not have: Hydra's
    ``+key=value`` adds keys past the schema."""
    hints = typing.get_type_hints(schema)
    unknown = []
    for key in cfg.keys():
        if key == "hydra":
            continue
        if key not in hints:
            unknown.append((f"{prefix}{key}", prefix.rstrip(".") or "the config"))
        elif dataclasses.is_dataclass(hints[key]):  # a section; `trainer` is Lightning's to check
            unknown += unknown_keys(cfg[key], hints[key], f"{prefix}{key}.")
    return unknown


def check_model_and_lora(cfg: DictConfig, problems: Problems) -> None:
    model_config = problems.build("model", lambda: gpt_config(cfg.model))
    if model_config is not None and not cfg.model.pretrained:
        problems.require(model_config.vocab_size >= ByteTokenizer.vocab_size, "model.vocab_size",
                         model_config.vocab_size, f"at least {ByteTokenizer.vocab_size} for the byte tokenizer")
    lora_config = problems.build("lora", lambda: lora_config_of(cfg.lora))
    problems.require(cfg.lora.enabled or cfg.lora.quantize == "none", "lora.quantize", cfg.lora.quantize,
                     "'none' with lora.enabled=false (lora=full trains every weight: none can stay quantized)")
    if lora_config is not None and model_config is not None and not cfg.model.pretrained:
        with torch.device("meta"):  # rank against the real layer shapes, at no cost
            problems.build("lora", lambda: inject_lora(GPT(model_config), lora_config))
    problems.require(cfg.model.pretrained is None or Path(cfg.model.pretrained).is_dir(), "model.pretrained",
                     cfg.model.pretrained, "an existing Hugging Face GPT-2 directory (or null)")


def check_data(node: DictConfig, section: str, problems: Problems) -> None:
    problems.require(node.corpus in CORPORA, f"{section}.corpus", node.corpus, f"one of {list(CORPORA)}")
    if node.corpus == "text" and node.get("train_path") is None:
        problems.lines.append(f"{section}.train_path is required with {section}.corpus=text "
                              f"(add {section}.train_path=my.txt)")
    problems.positive_int(node.batch_size, f"{section}.batch_size")
    problems.require(0 < node.val_fraction < 1, f"{section}.val_fraction", node.val_fraction, "a number in (0, 1)")
    if node.max_bytes is not None:
        problems.positive_int(node.max_bytes, f"{section}.max_bytes")
    for key in ("train_path", "val_path"):
        path = node.get(key)
        problems.require(path is None or Path(path).expanduser().is_file(), f"{section}.{key}", path,
                         "an existing text file")


def check_training(cfg: DictConfig, problems: Problems) -> None:
    problems.require(cfg.base.checkpoint is None or Path(cfg.base.checkpoint).is_file(), "base.checkpoint",
                     cfg.base.checkpoint, "an existing base-*.safetensors file (or null to pretrain)")
    problems.positive_int(cfg.base.steps, "base.steps")
    problems.number(cfg.base.lr, "base.lr")
    problems.require(cfg.base.warmup_steps >= 0, "base.warmup_steps", cfg.base.warmup_steps, "an integer >= 0")
    problems.number(cfg.optim.lr, "optim.lr")
    problems.number(cfg.optim.weight_decay, "optim.weight_decay", low_open=False)
    problems.number(cfg.optim.min_lr_ratio, "optim.min_lr_ratio", low_open=False, high=1)
    problems.require(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", cfg.optim.warmup_steps, "an integer >= 0")
    problems.require(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas",
                     list(cfg.optim.betas), "two numbers in [0, 1)")
    for key in sorted(set(cfg.trainer) - TRAINER_ARGS):
        allowed = ("set by loralab itself" if key in OWN_TRAINER_ARGS
                   else "a pytorch_lightning.Trainer argument")
        problems.lines.append(f"trainer.{key} is not allowed: {allowed}")
    problems.positive_int(cfg.trainer.get("max_steps"), "trainer.max_steps")
    problems.require(cfg.logger.name in LOGGERS, "logger.name", cfg.logger.name, f"one of {list(LOGGERS)}")
    if cfg.logger.name == "tensorboard":
        problems.require(importlib.util.find_spec("tensorboard") is not None, "logger", "tensorboard",
                         "an installed logger: `pip install tensorboard` first (or choose logger=csv)")
    if cfg.logger.name == "wandb":
        problems.require(cfg.logger.mode in WANDB_MODES, "logger.mode", cfg.logger.mode, f"one of {list(WANDB_MODES)}")
    problems.number(cfg.merge_tolerance, "merge_tolerance")


def gpt_config(model_cfg: DictConfig) -> GPTConfig:
    return GPTConfig(**{k: v for k, v in model_cfg.items() if k != "pretrained"})


def lora_config_of(lora_cfg: DictConfig) -> LoRAConfig | None:
    """The LoRAConfig a ``lora`` section describes, or None for full fine-tuning."""
    if not lora_cfg.enabled:
        return None
    values = OmegaConf.to_container(lora_cfg, resolve=True)
    values.pop("enabled")
    return LoRAConfig(**values)
