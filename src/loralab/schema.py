"""The config's schema: every key, its type and its default, in one place.

Registered in Hydra's ConfigStore as ``train_schema``, the first entry of
``conf/train.yaml``'s defaults list, so Hydra checks every key and type while it
composes: a typo (``lora.rnak=4``) or a wrong type (``seed=abc``) fails before
anything runs. The ``model`` and ``lora`` sections are derived from the dataclasses
they configure (``GPTConfig``, ``LoRAConfig``), so a field added there is a config key
with the same default. The YAML files in ``conf/`` hold only the values that differ
from these defaults. What only code can check (ranks against real layer shapes, files,
ranges) is ``loralab.config.validate``'s job.

omegaconf 2.3 types no unions: a key that takes a list *or* a string
(``lora.target_modules``) is ``Any`` here and checked by the validator.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from loralab.lora import LoRAConfig
from loralab.model import GPTConfig
from loralab.vit import ViTConfig


def schema_of(cls: type, name: str, extra: list[tuple]) -> type:
    """A config dataclass with ``cls``'s fields, types and defaults, plus ``extra`` fields."""
    hints = typing.get_type_hints(cls)
    own = []
    for f in fields(cls):
        kind = hints[f.name]
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            kind = Any  # omegaconf 2.3 types no unions
        default = (field(default_factory=f.default_factory) if f.default_factory is not MISSING
                   else field(default=f.default))
        own.append((f.name, kind, default))
    return make_dataclass(name, own + extra)


# kind=vit builds loralab.vit.ViT from the shared keys (n_layer, n_head, n_embd, dropout, bias)
# and the image ones below; the GPT's own keys (vocab_size, ...) are then unused
VIT_ONLY = [f for f in fields(ViTConfig) if f.name not in {g.name for g in fields(GPTConfig)}]
ModelConfig = schema_of(GPTConfig, "ModelConfig", [
    ("pretrained", Optional[str], field(default=None)),  # a local Hugging Face GPT-2 directory
    ("kind", str, field(default="gpt")),  # gpt | vit
    *[(f.name, int, field(default=f.default)) for f in VIT_ONLY],  # image_size, patch_size, ...: integers
])
LoRASection = schema_of(LoRAConfig, "LoRASection", [
    ("enabled", bool, field(default=True)),  # false: the full fine-tuning baseline
])


@dataclass
class DataConfig:
    corpus: str = "pydoc_topics"
    batch_size: int = 16
    val_fraction: float = 0.1  # held out to choose on (val/loss: the best lr, the best setting)
    test_fraction: float = 0.1  # held out after it, to report on (test/loss)
    max_bytes: Optional[int] = None  # cut the corpus to this many characters
    train_path: Optional[str] = None
    val_path: Optional[str] = None
    test_path: Optional[str] = None  # without it, the held-out text is cut val_fraction : test_fraction


@dataclass
class BaseConfig:
    checkpoint: Optional[str] = None  # a base-*.safetensors to load instead of pretraining
    corpus: str = "python_stdlib"
    max_bytes: Optional[int] = 1_000_000
    val_fraction: float = 0.05
    batch_size: int = 16
    steps: int = 500
    lr: float = 3e-3
    warmup_steps: int = 50
    seed: int = 0  # the base's own seed: a sweep over `seed` keeps one base


@dataclass
class OptimConfig:
    lr: float = 1e-2
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    lora_plus_ratio: float = 1.0  # LoRA+: lora_B's lr over lora_A's (1 = plain LoRA; the paper uses 16)


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | csv | tensorboard | none
    project: str = "loralab"
    entity: Optional[str] = None
    mode: str = "auto"  # auto | offline | online | disabled


@dataclass
class PathsConfig:
    output_dir: str = "${hydra:runtime.output_dir}"  # where this run writes summary.json and its adapter
    cache_dir: str = "outputs/cache"  # pretrained bases, keyed by everything that determines them


@dataclass
class CheckpointConfig:
    every_n_steps: int = 50  # a Lightning checkpoint (<run_dir>/checkpoints/last.ckpt) this often; resume=true uses it


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRASection = field(default_factory=LoRASection)
    data: DataConfig = field(default_factory=DataConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: Dict[str, Any] = field(default_factory=dict)  # pytorch_lightning.Trainer arguments
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: bool = False  # continue this run (or sweep) from its checkpoints; completed jobs are left untouched
    seed: int = 1337  # LoRA's initialisation and the data order
    merge_tolerance: float = 1e-5  # lora/merge_ok: merged vs unmerged logits within this × the largest logit


ConfigStore.instance().store(name="train_schema", node=TrainConfig)
