"""The kinds of model a run fine-tunes (``model.kind``): a text GPT, or a ViT that
classifies images. Everything that differs between them is here, so the rest of the
code asks the kind instead of testing which class a model is.

The data modules import Lightning: they are imported only when a kind builds its data,
so the tools that only load a base (export, analyze) stay light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from omegaconf import DictConfig

from loralab.model import GPT, GPTConfig
from loralab.vit import ViT, ViTConfig


@dataclass(frozen=True)
class ModelKind:
    name: str  # model.kind
    model_class: type[nn.Module]
    config_class: type
    metadata_key: str  # the key a base file stores the model's config under
    n_classes: Callable[[nn.Module], int]  # the classes val/acc counts
    positions: Callable[[nn.Module, torch.Tensor], int]  # what perf/tokens_per_s counts in a batch of inputs
    corpora: Callable[[], tuple[str, ...]]  # the corpora it trains on
    data_module: Callable  # (data section, seed, config, tokenizer) -> its LightningDataModule
    new_head: bool  # fine-tuning replaces the base's output head (it was trained for other classes)


def text_data(section: DictConfig, seed: int, config: GPTConfig, tokenizer=None):
    from loralab.data import TextDataModule

    # a base's section holds out no test part: it has no test_fraction
    return TextDataModule(corpus=section.corpus, block_size=config.block_size, batch_size=section.batch_size,
                          val_fraction=section.val_fraction, test_fraction=section.get("test_fraction", 0.0),
                          max_bytes=section.max_bytes, train_path=section.get("train_path"),
                          val_path=section.get("val_path"), test_path=section.get("test_path"),
                          tokenizer=tokenizer, seed=seed)


def digits_data(section: DictConfig, seed: int, config: ViTConfig, tokenizer=None):
    from loralab.vision_data import DigitsDataModule

    return DigitsDataModule(section.corpus, section.batch_size, section.val_fraction,
                            section.get("test_fraction", 0.0), seed)


def text_corpora() -> tuple[str, ...]:
    from loralab.data import CORPORA

    return CORPORA


def digit_corpora() -> tuple[str, ...]:
    from loralab.vision_data import DIGIT_CORPORA

    return tuple(DIGIT_CORPORA)


GPT_KIND = ModelKind(
    name="gpt", model_class=GPT, config_class=GPTConfig, metadata_key="gpt_config",
    n_classes=lambda model: model.config.vocab_size,
    positions=lambda model, inputs: inputs.numel(),  # (B, T) tokens
    corpora=text_corpora, data_module=text_data, new_head=False)
VIT_KIND = ModelKind(
    name="vit", model_class=ViT, config_class=ViTConfig, metadata_key="vit_config",
    n_classes=lambda model: model.config.n_classes,
    # the patches and the class token of each image (B, C, H, W), not its pixels
    positions=lambda model, inputs: inputs.shape[0] * (model.config.n_patches + 1),
    corpora=digit_corpora, data_module=digits_data, new_head=True)
KINDS = {kind.name: kind for kind in (GPT_KIND, VIT_KIND)}


def kind_of(model_or_config) -> ModelKind:
    """The kind of a model, or of a model config."""
    for kind in KINDS.values():
        if isinstance(model_or_config, (kind.model_class, kind.config_class)):
            return kind
    raise TypeError(f"{type(model_or_config).__name__} is not a model loralab trains: expected one of "
                    f"{[kind.model_class.__name__ for kind in KINDS.values()]}")


def build_model(config: GPTConfig | ViTConfig) -> GPT | ViT:
    return kind_of(config).model_class(config)


def replace_head(model: nn.Module) -> None:
    """A new output head from the current seed, initialised as the model initialises its own."""
    model._init_weights(model.head)
