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

from loralab.base import BaseError, config_of_base, read_base_metadata
from loralab.data import CORPORA, ByteTokenizer, corpus_splits, read_text_file, tokenizer_of
from loralab.files import WRITABLE_DIR, unwritable
from loralab.gpt2 import WEIGHTS, our_target_modules, read_gpt2_config
from loralab.hardware import available_accelerators, device_kind, precision_problem, unified_precision
from loralab.lora import LoRAConfig, inject_lora
from loralab.model import GPTConfig
from loralab.model_kinds import KINDS, build_model
from loralab.schema import TrainConfig
from loralab.vit import ViTConfig

LOGGERS = ("wandb", "csv", "tensorboard", "none")
WANDB_MODES = ("auto", "offline", "online", "disabled")
# Trainer arguments loralab sets itself (loralab.run.fit); a config cannot override them
OWN_TRAINER_ARGS = {"logger", "callbacks", "check_val_every_n_epoch", "num_sanity_val_steps", "inference_mode",
                    "enable_checkpointing", "enable_model_summary", "default_root_dir"}
TRAINER_ARGS = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"} - OWN_TRAINER_ARGS
SEEDS = (0, 2**32 - 1)  # what seed_everything accepts (numpy's seeds)


class ConfigError(CompactHydraException, ValueError):
    pass


class Problems:
    """The config's problems, one line each, collected so that all are reported at once."""

    def __init__(self):
        self.lines: list[str] = []
        self.keys: set[str] = set()  # the keys named so far

    def require(self, ok: bool, key: str, value, allowed: str) -> None:
        if not ok:
            self.lines.append(f"{key}={value!r} is invalid: expected {allowed}")
            self.keys.add(key)

    def build(self, section: str, make):
        """``make()``'s result, or None with its error recorded under ``section``."""
        try:
            return make()
        except (TypeError, ValueError, ImportError) as e:  # ImportError: an optional package not installed
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

    def finite(self, node: dict, prefix: str = "") -> None:
        """Every float under ``node`` finite: a NaN or inf is never a setting (null switches things off)."""
        for key, value in node.items():
            if isinstance(value, dict):
                self.finite(value, f"{prefix}{key}.")
            elif isinstance(value, float) and not math.isfinite(value) and f"{prefix}{key}" not in self.keys:
                self.require(False, f"{prefix}{key}", value, "a finite number")


def validate(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every problem of ``cfg``, one line each. Cheap: files
    are read, checkpoints only to their header, the model built only on the meta device."""
    problems = Problems()
    missing = sorted(OmegaConf.missing_keys(cfg))
    for key in missing:
        problems.lines.append(f"config value {key} is required but not set (add {key}=...)")
    unknown = unknown_keys(cfg)
    problems.lines += [f"unknown config key {key!r}: {where} has no such key (see `python train.py --cfg job`)"
                       for key, where in unknown]
    if not missing:
        base_config = check_model_and_lora(cfg, problems, skip={where for _, where in unknown})
        tokenizer = None if base_config is None else problems.build(  # a GPT-2 tokenizer needs `tokenizers`
            "model.pretrained", lambda: tokenizer_of(cfg.model.pretrained))
        corpora = KINDS.get(cfg.model.kind, KINDS["gpt"]).corpora()  # a bad kind is reported above
        text_config = base_config if isinstance(base_config, GPTConfig) else None  # images need no block check
        check_data(cfg.data, "data", problems, text_config, tokenizer, corpora)
        pretrains = not cfg.model.pretrained and not cfg.base.checkpoint
        check_data(cfg.base, "base", problems, text_config if pretrains else None, ByteTokenizer(), corpora)
        check_training(cfg, problems)
        check_hardware(cfg.trainer, problems)
        check_cache_dir(cfg.paths.cache_dir, problems)
        problems.finite(OmegaConf.to_container(cfg, resolve=False))
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


def check_model_and_lora(cfg: DictConfig, problems: Problems, skip: set[str]) -> GPTConfig | ViTConfig | None:
    """Check the model and LoRA sections (but those in ``skip``: they have unknown keys);
    return the config of the base the run will fine-tune (a GPT-2 directory's, a
    checkpoint's, or the model section's), or None."""
    model_config = None if "model" in skip else problems.build("model", lambda: model_config_of(cfg.model))
    problems.require(cfg.model.kind == "gpt" or not cfg.model.pretrained, "model.pretrained", cfg.model.pretrained,
                     "null with model.kind=vit (a pretrained directory holds a GPT-2)")
    if isinstance(model_config, GPTConfig) and not cfg.model.pretrained:
        problems.require(model_config.vocab_size >= ByteTokenizer.vocab_size, "model.vocab_size",
                         model_config.vocab_size, f"at least {ByteTokenizer.vocab_size} for the byte tokenizer")
        if not cfg.base.checkpoint and is_gpt2_shape(model_config):
            problems.lines.append(GPT2_WITHOUT_WEIGHTS)
    if cfg.model.pretrained:
        base_config = pretrained_config(cfg.model.pretrained, problems)
    elif cfg.base.checkpoint:
        base_config = checkpoint_config(cfg.base.checkpoint, problems)
    else:
        base_config = model_config
    lora_config = None if "lora" in skip else problems.build("lora", lambda: lora_config_of(cfg.lora))
    problems.require(cfg.lora.enabled or cfg.lora.quantize == "none", "lora.quantize", cfg.lora.quantize,
                     "'none' with lora.enabled=false (lora=full trains every weight: none can stay quantized)")
    problems.require(cfg.lora.enabled or not cfg.lora.dora, "lora.dora", cfg.lora.dora,
                     "false with lora.enabled=false (lora=full has no low-rank update for DoRA to decompose)")
    if lora_config is not None and base_config is not None:
        with torch.device("meta"):  # rank against the real layer shapes, at no cost
            problems.build("lora", lambda: inject_lora(build_model(base_config), lora_config))
    return base_config


GPT2_WITHOUT_WEIGHTS = (
    "model=gpt2 needs model.pretrained: a local Hugging Face GPT-2 directory (config.json, model.safetensors, "
    "tokenizer files), e.g. saved on a machine with internet by `huggingface-cli download gpt2 --local-dir gpt2` "
    "and copied here (nothing downloads at run time; without it the run would pretrain a random 124M GPT-2, "
    "hours on a CPU)")


def is_gpt2_shape(config: GPTConfig) -> bool:
    """GPT-2 small's shape (GPTConfig's defaults, conf/model/gpt2.yaml): only worth running with its weights."""
    gpt2 = GPTConfig()
    return all(getattr(config, key) == getattr(gpt2, key) for key in ("n_layer", "n_head", "n_embd", "vocab_size"))


def pretrained_config(directory: str, problems: Problems) -> GPTConfig | None:
    """The GPTConfig of a Hugging Face GPT-2 directory: its config.json read, its weights present."""
    allowed = "a Hugging Face GPT-2 directory or null"
    if not Path(directory).expanduser().is_dir():
        problems.require(False, "model.pretrained", directory, f"{allowed}; there is no such directory")
        return None
    try:
        config = read_gpt2_config(Path(directory).expanduser())
    except (ValueError, OSError) as e:  # no config.json, unreadable JSON, or an unsupported GPT-2 variant
        problems.require(False, "model.pretrained", directory, f"{allowed}; {e}")
        return None
    if not any((Path(directory).expanduser() / name).is_file() for name in WEIGHTS):
        problems.require(False, "model.pretrained", directory, f"{allowed}; it holds none of {list(WEIGHTS)}")
        return None
    return config


def checkpoint_config(path: str, problems: Problems) -> GPTConfig | ViTConfig | None:
    """The GPTConfig in a loralab base file's header (its weights are not read here)."""
    allowed = "a base-*.safetensors file written by loralab, or null to pretrain"
    if not Path(path).expanduser().is_file():
        problems.require(False, "base.checkpoint", path, f"{allowed}; there is no such file")
        return None
    try:
        return config_of_base(read_base_metadata(Path(path).expanduser()))
    except (BaseError, ValueError, TypeError) as e:
        problems.require(False, "base.checkpoint", path, f"{allowed}; {e}")
        return None


def check_data(node: DictConfig, section: str, problems: Problems, base_config: GPTConfig | None = None,
               tokenizer=None, corpora: tuple[str, ...] = CORPORA) -> None:
    """The section's keys, its files (readable UTF-8 text) and, given the base's config, that
    the train, validation and test splits each hold at least one block of the model. A
    base's section has no test split (no ``test_fraction``)."""
    before = len(problems.lines)
    problems.require(node.corpus in corpora, f"{section}.corpus", node.corpus, f"one of {list(corpora)}")
    if node.corpus == "text" and node.get("train_path") is None:
        problems.lines.append(f"{section}.train_path is required with {section}.corpus=text "
                              f"(add {section}.train_path=my.txt)")
    problems.positive_int(node.batch_size, f"{section}.batch_size")
    problems.require(0 < node.val_fraction < 1, f"{section}.val_fraction", node.val_fraction, "a number in (0, 1)")
    test_fraction = node.get("test_fraction")
    if test_fraction is not None:
        problems.require(0 < test_fraction < 1 - node.val_fraction, f"{section}.test_fraction", test_fraction,
                         f"a number in (0, 1 - val_fraction={node.val_fraction})")
    if node.max_bytes is not None:
        problems.positive_int(node.max_bytes, f"{section}.max_bytes")
    for key in ("train_path", "val_path", "test_path"):
        path = node.get(key)
        if path is None or node.corpus != "text":
            continue
        if not Path(path).expanduser().is_file():
            problems.require(False, f"{section}.{key}", path, "an existing text file")
            continue
        try:
            read_text_file(path)
        except (OSError, ValueError) as e:
            problems.require(False, f"{section}.{key}", path, f"a readable UTF-8 text file; {e}")
    if base_config is not None and tokenizer is not None and len(problems.lines) == before:
        check_splits_hold_a_block(node, section, problems, base_config.block_size, tokenizer)


def check_splits_hold_a_block(node: DictConfig, section: str, problems: Problems, block_size: int,
                              tokenizer) -> None:
    """Every split, made as ``data.corpus_splits`` makes them, holds ``block_size + 1`` tokens;
    the line names the key that made them short (the file, or ``max_bytes`` where it cut)."""
    paths = {key: node.get(key) if node.corpus == "text" else None for key in ("val_path", "test_path")}
    splits = corpus_splits(node.corpus, node.max_bytes, node.val_fraction, node.get("test_fraction") or 0.0,
                           node.get("train_path"), paths["val_path"], paths["test_path"])
    needed = block_size + 1
    counts = {"train": tokenizer.count(splits.train), "validation": tokenizer.count(splits.val)}
    if node.get("test_fraction"):
        counts["test"] = tokenizer.count(splits.test)
    short = [split for split, tokens in counts.items() if tokens < needed]
    if not short:
        check_train_split_holds_a_batch(node, section, problems, (counts["train"] - 1) // block_size, needed)
        return
    cut_from_train = len(splits.train) + (0 if paths["val_path"] else len(splits.val) + len(splits.test))
    cut = node.max_bytes is not None and not paths["val_path"] and cut_from_train >= node.max_bytes
    if short == ["test"] and paths["test_path"]:
        key = "test_path"
    elif set(short) <= {"validation", "test"} and paths["val_path"]:
        key = "val_path"
    else:
        key = "max_bytes" if cut else "train_path" if node.corpus == "text" else "corpus"
    held = ", ".join(f"{counts[split]} in the {split} split" for split in short)
    fractions = [f"val_fraction={node.val_fraction}"] if not paths["val_path"] else []
    if counts.keys() >= {"test"} and not paths["test_path"]:
        fractions.append(f"test_fraction={node.test_fraction}")
    split_by = f" ({', '.join(fractions)})" if fractions else ""
    problems.require(False, f"{section}.{key}", node[key],
                     f"text for at least one block of the model ({needed} tokens) in each split; it holds "
                     f"{held}{split_by}")


def check_train_split_holds_a_batch(node: DictConfig, section: str, problems: Problems, windows: int,
                                    needed: int) -> None:
    """A training step takes one whole batch of windows (the loader drops a short last batch):
    a train split of fewer windows than a batch would "train" for zero steps."""
    problems.require(windows >= node.batch_size, f"{section}.batch_size", node.batch_size,
                     f"at most the {windows} windows of {needed} tokens in {section}'s train split "
                     f"(a smaller batch, or more text)")


def check_training(cfg: DictConfig, problems: Problems) -> None:
    for key in ("seed", "base.seed"):
        seed = OmegaConf.select(cfg, key)
        problems.require(SEEDS[0] <= seed <= SEEDS[1], key, seed, f"an integer in [{SEEDS[0]}, {SEEDS[1]}]")
    problems.positive_int(cfg.base.steps, "base.steps")
    problems.number(cfg.base.lr, "base.lr")
    problems.require(cfg.base.warmup_steps >= 0, "base.warmup_steps", cfg.base.warmup_steps, "an integer >= 0")
    problems.number(cfg.optim.lr, "optim.lr")
    problems.number(cfg.optim.weight_decay, "optim.weight_decay", low_open=False)
    problems.number(cfg.optim.min_lr_ratio, "optim.min_lr_ratio", low_open=False, high=1)
    problems.number(cfg.optim.lora_plus_ratio, "optim.lora_plus_ratio")
    problems.require(cfg.lora.enabled or cfg.optim.lora_plus_ratio == 1, "optim.lora_plus_ratio",
                     cfg.optim.lora_plus_ratio, "1 with lora.enabled=false (LoRA+ sets the lr of lora_B, which "
                     "lora=full does not have)")
    problems.require(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", cfg.optim.warmup_steps, "an integer >= 0")
    problems.require(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas",
                     list(cfg.optim.betas), "two numbers in [0, 1)")
    for key in sorted(set(cfg.trainer) - TRAINER_ARGS):
        allowed = ("set by loralab itself" if key in OWN_TRAINER_ARGS
                   else "a pytorch_lightning.Trainer argument")
        problems.lines.append(f"trainer.{key} is not allowed: {allowed}")
    problems.positive_int(cfg.trainer.get("max_steps"), "trainer.max_steps")
    problems.positive_int(cfg.checkpoint.every_n_steps, "checkpoint.every_n_steps")
    problems.require(cfg.logger.kind in LOGGERS, "logger.kind", cfg.logger.kind, f"one of {list(LOGGERS)}")
    if cfg.logger.kind == "tensorboard":
        problems.require(importlib.util.find_spec("tensorboard") is not None, "logger", "tensorboard",
                         "an installed logger: `pip install tensorboard` first (or choose logger=csv)")
    if cfg.logger.kind == "wandb":
        problems.require(cfg.logger.mode in WANDB_MODES, "logger.mode", cfg.logger.mode, f"one of {list(WANDB_MODES)}")
    problems.number(cfg.merge_tolerance, "merge_tolerance")


def check_cache_dir(cache_dir: str, problems: Problems) -> None:
    """The cache of pretrained bases can be made and written; the run's own directory is
    checked before Hydra makes it (``loralab.resume``)."""
    why_not = unwritable(cache_dir)
    problems.require(why_not is None, "paths.cache_dir", cache_dir, f"{WRITABLE_DIR}; {why_not}")


def check_trainer_numbers(trainer: DictConfig, problems: Problems) -> None:
    """The Trainer numbers conf/trainer sets, in the ranges Lightning accepts with loralab's
    own arguments (``check_val_every_n_epoch=None``: validation every so many steps)."""
    for key in ("val_check_interval", "log_every_n_steps"):
        if key in trainer:
            problems.positive_int(trainer[key], f"trainer.{key}")
    if trainer.get("limit_val_batches") is not None:
        value = trainer.limit_val_batches
        problems.require((isinstance(value, int) and value > 0) or (isinstance(value, float) and 0 < value <= 1),
                         "trainer.limit_val_batches", value, "a number of batches > 0 or a fraction in (0, 1]")
    if trainer.get("gradient_clip_val") is not None:
        problems.number(trainer.gradient_clip_val, "trainer.gradient_clip_val", low_open=False)


def check_hardware(trainer: DictConfig, problems: Problems) -> None:
    """The accelerator is on this machine and runs the precision as configured."""
    check_trainer_numbers(trainer, problems)
    accelerator = str(trainer.get("accelerator", "auto"))
    device = device_kind(accelerator)
    if device is None:
        problems.require(False, "trainer.accelerator", accelerator,
                         f"an accelerator this machine has: one of {available_accelerators()}")
        return
    precision = trainer.get("precision", "32-true")
    unified = problems.build("trainer.precision", lambda: unified_precision(precision))
    if unified is not None:
        why_not = precision_problem(unified, device)
        problems.require(why_not is None, "trainer.precision", precision,
                         f"a precision the {device} runs as configured; {why_not}")


def model_config_of(model_cfg: DictConfig) -> GPTConfig | ViTConfig:
    """The GPTConfig (``kind=gpt``) or ViTConfig (``kind=vit``) the model section describes."""
    if model_cfg.kind not in KINDS:
        raise ValueError(f"model.kind={model_cfg.kind!r} is invalid: expected one of {list(KINDS)}")
    config_class = KINDS[model_cfg.kind].config_class
    return config_class(**{f.name: model_cfg[f.name] for f in dataclasses.fields(config_class)})


def lora_config_of(lora_cfg: DictConfig) -> LoRAConfig | None:
    """The LoRAConfig a ``lora`` section describes, or None for full fine-tuning."""
    if not lora_cfg.enabled:
        return None
    values = OmegaConf.to_container(lora_cfg, resolve=True)
    values.pop("enabled")
    if isinstance(values["target_modules"], list):  # Hugging Face GPT-2's names too (c_attn, c_proj, ...)
        values["target_modules"] = our_target_modules(values["target_modules"])
    return LoRAConfig(**values)
