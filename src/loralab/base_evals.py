"""The base's whole-split evaluations, computed once per (base, split) and kept beside the base.

Every job of a sweep evaluates its untouched model before training: val/ metrics on the
whole validation split, and the loss on the test split and on the base's own held-out
domain (forget). Before training a LoRA job computes exactly what its base computes
(B = 0), so these numbers are the same for every job on one base; the first job that needs
one computes it, the others read it. A result is keyed by the base's SHA-256 and by the
split's exact tokens, window length and batch size, and written atomically as JSON in
``<paths.cache_dir>/base-evals/<sha256>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

from loralab.files import write_json

log = logging.getLogger(__name__)


def split_key(split: str, dataset, batch_size: int) -> str | None:
    """What a whole-split evaluation depends on besides the model: the split's tokens, its
    window length and the batch size (the order the mean sums in). None for a dataset that
    is not token windows (images)."""
    ids = getattr(dataset, "ids", None)
    if ids is None:
        return None
    h = hashlib.sha256(ids.numpy().tobytes())
    h.update(f"{dataset.block_size}/{batch_size}".encode())
    return f"{split}-{h.hexdigest()[:16]}"


class BaseEvaluations:
    """The cached evaluations of one base (by its SHA-256) in ``cache_dir``."""

    def __init__(self, cache_dir: str | Path, base_sha256: str):
        self.dir = Path(cache_dir) / "base-evals" / base_sha256[:16]

    def get(self, key: str | None, compute: Callable[[], dict]) -> dict:
        """The metrics cached under ``key``; on a miss (or no key), ``compute()``'s, kept under it."""
        if key is None:
            return compute()
        path = self.dir / f"{key}.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError as e:  # damaged: computed again and replaced
                log.warning("%s cannot be read (%s): evaluating the base again", path, e)
        metrics = compute()
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(path, metrics)
        return metrics
