"""How loralab starts W&B: offline unless the user has set it up, so a run never waits for
a network or a login; online, a server that does not answer within ``ONLINE_WAIT_S`` makes
the run log offline instead, saying so. Shared by the training runs' logger and the sweep
tools."""

from __future__ import annotations

import logging
import netrc
import os

log = logging.getLogger(__name__)

# how long an online run waits for the W&B server (W&B's own default is 90 s, then a traceback);
# WANDB_INIT_TIMEOUT in the environment wins
ONLINE_WAIT_S = 15.0


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


def start_wandb(mode: str, **init_args):
    """``wandb.init(**init_args)`` in ``wandb_mode(mode)``, quiet (loralab prints its own lines).
    Online, an unreachable server costs at most ``ONLINE_WAIT_S``: the run then starts offline,
    with one warning saying how to upload it later."""
    import wandb

    mode = wandb_mode(mode)
    wait = {} if "WANDB_INIT_TIMEOUT" in os.environ else {"init_timeout": ONLINE_WAIT_S}
    if mode != "online":
        return wandb.init(mode=mode, settings=wandb.Settings(quiet=True), **init_args)
    try:
        return wandb.init(mode=mode, settings=wandb.Settings(quiet=True, **wait), **init_args)
    except wandb.errors.CommError as e:
        first_line = str(e).splitlines()[0]
        wandb.teardown()  # the service still holds the run that did not start: its id would be "in use"
        runs = os.path.join(init_args.get("dir") or ".", "wandb", "offline-run-*")
        log.warning("W&B did not answer (%s): logging offline instead; `wandb sync %s` uploads the run later",
                    first_line, runs)
        return wandb.init(mode="offline", settings=wandb.Settings(quiet=True), **init_args)
