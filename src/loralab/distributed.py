"""Lightning DDP inside Hydra: one run across ``trainer.devices`` processes, also as one
job of a multirun.

Lightning's DDP launcher starts the other ranks by running the command line again:
``sys.argv`` plus ``hydra.run.dir=<HydraConfig's run.dir>`` (``_hydra_subprocess_cmd``
in ``lightning.fabric.strategies.launchers.subprocess_script``, Lightning 2.6). In a
multirun that command still holds ``-m`` and the whole sweep, so every rank would start
a sweep of its own. ``run_only_this_job`` makes it this job's own command, run in this
job's directory; ``end_process_group`` lets the next job of the same process start its
own ranks. Only global rank 0 writes summary.json, the adapter and the report, and only
it opens a W&B run (Lightning's loggers are rank-zero only).
"""

from __future__ import annotations

import hashlib
import os
import sys

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import read_write

# What Lightning's launcher puts into the environment of the process that starts the ranks.
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def is_rank_zero() -> bool:
    """Global rank 0, or not distributed at all (read from RANK / LOCAL_RANK / SLURM_PROCID)."""
    return getattr(rank_zero_only, "rank", 0) == 0


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_only_this_job(trainer_cfg) -> None:
    """For a DDP multirun job, make the command Lightning re-runs for the other ranks this
    job alone: the script, its config flags, this job's own overrides (no ``-m``, no sweep),
    and this job's directory as the run directory."""
    if not str(trainer_cfg.get("strategy", "auto")).startswith("ddp") or not in_multirun():
        return  # a single run: Lightning's re-run of the command line is already right
    hydra = HydraConfig.get()
    sys.argv = [sys.argv[0], *config_flags(sys.argv[1:]), *hydra.overrides.task]
    with read_write(hydra.run):
        hydra.run.dir = hydra.runtime.output_dir


def config_flags(argv: list[str]) -> list[str]:
    """--config-path / --config-name / --config-dir as given on the command line."""
    args = get_args_parser().parse_args(argv)
    flags = {"--config-path": args.config_path, "--config-name": args.config_name, "--config-dir": args.config_dir}
    return [f"{flag}={value}" for flag, value in flags.items() if value is not None]


def end_process_group() -> None:
    """After a multirun job trained with DDP: close its process group and forget the
    launch's environment, so the next job in this process starts ranks of its own
    instead of waiting for the previous job's (which have exited)."""
    if not in_multirun():
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key in LAUNCH_ENV:
        os.environ.pop(key, None)


class ReplicaCheck(pl.Callback):
    """ddp/replicas_identical: whether every rank ends training with bit-identical trainable
    weights (the adapter that rank 0 saves stands for all of them). DDP keeps them so by
    averaging the gradients; a rank-dependent initialisation or a trainable parameter
    outside DDP's reach would break it."""

    def __init__(self):
        self.metrics: dict = {}

    def on_fit_end(self, trainer, pl_module):
        if trainer.world_size == 1:
            return
        digest = torch.tensor(trainable_digest(pl_module.model), device=pl_module.device)
        digests = trainer.strategy.all_gather(digest)  # (world_size,)
        self.metrics = {"ddp/world_size": trainer.world_size,
                        "ddp/replicas_identical": bool((digests == digests[0]).all())}


def trainable_digest(model: torch.nn.Module) -> int:
    """A hash of the trainable parameters' names and exact values, as an int64."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())  # float() is exact from bf16/fp16
    return int.from_bytes(h.digest()[:7], "little")
