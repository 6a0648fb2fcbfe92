"""A console that speaks only when it matters: known, harmless upstream noise silenced at
its source, one targeted filter each (message, category, module), never warnings wholesale.

W&B's own noise is not caused in the first place (``loralab.loggers``: the run is started
without Lightning's ``anonymous=None``, quietly); Lightning's "Seed set to" line is
switched off where loralab seeds (``seed_everything(verbose=False)``).
"""

from __future__ import annotations

import logging
import re
import warnings

# Lightning's rank-zero INFO lines that say nothing about this run
LIGHTNING_NOISE = re.compile("|".join([
    r"💡 Tip: For seamless cloud logging",  # an advertisement for litlogger, printed by every Trainer
    r"GPU available: False, used: False",  # nothing to choose from (when a GPU is present the line stays)
    r"TPU available: False, using: 0 TPU cores",
    r"`Trainer\.fit` stopped: `max_steps=\d+` reached\.",  # the run ended as configured
]))


class LightningNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not LIGHTNING_NOISE.match(record.getMessage())


def silence_known_noise() -> None:
    """Install the filters (idempotent)."""
    # torch >= 2.10 deprecates LeafSpec; Lightning's own pytree helper still builds one per batch
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"pytorch_lightning\.utilities\._pytree")
    # loralab's LitTransformer returns None on purpose from a diverged step: the optimizer must not step
    warnings.filterwarnings("ignore", message=r"`training_step` returned `None`", category=UserWarning,
                            module=r"pytorch_lightning\.loops\.optimization\.automatic")
    lightning = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, LightningNoise) for f in lightning.filters):
        lightning.addFilter(LightningNoise())
