"""The learning-rate schedule every fine-tuning run uses (solo or packed). Depends on nothing."""

from __future__ import annotations

import math


def warmup_cosine(warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """Linear warm-up to the peak learning rate, then cosine decay to ``min_lr_ratio`` of it."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor
