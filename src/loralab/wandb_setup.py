"""How loralab starts W&B: offline unless the user has set it up, so a run never waits for
a network or a login. Shared by the training runs' logger and the sweep tools."""

from __future__ import annotations

import netrc
import os


def wandb_mode(mode: str) -> str:
    """WANDB_MODE wins; `auto` is online only when an API key is configured."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb() else "offline"


def _netrc_has_wandb() -> bool:
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
