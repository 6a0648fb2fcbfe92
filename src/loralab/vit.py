"""A small Vision Transformer from the GPT's own blocks, for LoRA beyond language.

Dosovitskiy et al., "An Image is Worth 16x16 Words" (2021), §3.1: cut the image into
patches, embed each with one linear map, prepend a learned class token, add learned
position embeddings, run pre-LayerNorm transformer blocks (here ``model.Block`` with
attention that is not causal: patches have no order), and classify the class token
after a final LayerNorm. The patch embedding is an ``nn.Linear`` over flattened patches
(the paper's formulation, equal to a stride-p convolution) so LoRA can target it too;
the blocks keep ``q_proj, k_proj, v_proj, o_proj, fc_in, fc_out``.

This module depends on torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from loralab.model import Block, check_transformer_config


@dataclass
class ViTConfig:
    image_size: int = 8
    patch_size: int = 2
    channels: int = 1
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    n_classes: int = 10
    dropout: float = 0.0
    bias: bool = True  # read by model.Block, as in GPTConfig

    def __post_init__(self):
        check_transformer_config(self, ("image_size", "patch_size", "channels", "n_layer", "n_head", "n_embd",
                                        "n_classes"))
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig image_size={self.image_size} is not divisible by "
                             f"patch_size={self.patch_size}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size ** 2


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.patch_embed = nn.Linear(config.patch_dim, config.n_embd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.n_embd))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.n_patches + 1, config.n_embd))
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, causal=False) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.n_classes)
        self.apply(self._init_weights)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, C·p·p), patches in row-major order."""
        B, C, H, W = images.shape
        p = self.config.patch_size
        x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, H/p, p, W/p, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        """images (B, C, H, W) -> class logits (B, n_classes), and the mean cross-entropy
        when ``targets`` (B,) are given."""
        x = self.patch_embed(self.patchify(images))  # (B, N, C)
        cls = self.cls_token.expand(x.size(0), -1, -1)  # (B, 1, C)
        x = self.drop(torch.cat([cls, x], dim=1) + self.pos_embed)  # (B, N + 1, C)
        for block in self.h:
            x, _ = block(x)
        logits = self.head(self.ln_f(x[:, 0]))  # (B, n_classes): the class token alone
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits, targets)
