"""The run's identity in a sweep, and the logger that records it (W&B by default).

W&B is offline unless the user has set it up, so it never waits for a network or
a login; every run is closed in a ``finally`` so the jobs of a multirun never
share a W&B run.
"""

from __future__ import annotations

import netrc
import os
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from loralab.report import parse_overrides


@dataclass
class RunIdentity:
    name: str  # the job's swept overrides, e.g. "lora.rank=4"
    group: str | None  # the sweep directory, for multirun jobs
    overrides: list[str]


def run_identity(cfg: DictConfig) -> RunIdentity:
    if not HydraConfig.initialized():  # composed without @hydra.main (e.g. the compose API)
        return RunIdentity(name=Path(cfg.paths.output_dir).name, group=None, overrides=[])
    hydra = HydraConfig.get()
    overrides = list(hydra.overrides.task)
    if hydra.mode != RunMode.MULTIRUN:
        return RunIdentity(name=hydra.job.override_dirname or "default", group=None, overrides=overrides)
    swept = swept_keys(Path(hydra.sweep.dir))
    if swept is None:  # a sweeper that writes no multirun.yaml (Optuna's) has its search space here
        swept = set(hydra.sweeper.get("params") or {}) or None
    own = [override for key, _, override in parse_overrides(overrides) if swept is None or key in swept]
    return RunIdentity(name=",".join(own) or hydra.job.override_dirname or "default",
                       group=Path(hydra.sweep.dir).as_posix(), overrides=overrides)


def swept_keys(sweep_dir: Path) -> set[str] | None:
    """Keys the sweep varies (``lora.rank`` in ``-m lora.rank=4,8``, or in an experiment's
    ``hydra.sweeper.params``), read from the multirun.yaml Hydra's sweepers write before
    the jobs start; None if there is none."""
    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return None
    hydra = OmegaConf.load(path).hydra
    parsed = OverridesParser.create().parse_overrides(list(hydra.overrides.task))
    from_config = hydra.sweeper.get("params") or {}  # sweeps an experiment file declares
    return {o.key_or_group for o in parsed if o.is_sweep_override()} | set(from_config)



def flatten(config: dict, prefix: str = "") -> dict:
    """{"lora": {"rank": 4}} -> {"lora.rank": 4}, so W&B can group and filter by each key."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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


def make_logger(cfg: DictConfig, identity: RunIdentity, job_type: str):
    """The Lightning logger ``cfg.logger`` names, or None."""
    kind, save_dir = cfg.logger.name, cfg.paths.output_dir
    if kind == "csv":
        from pytorch_lightning.loggers import CSVLogger
        return CSVLogger(save_dir, name="csv", version=job_type)
    if kind == "tensorboard":
        from pytorch_lightning.loggers import TensorBoardLogger
        return TensorBoardLogger(save_dir, name="tensorboard", version=job_type)
    if kind == "wandb":
        from pytorch_lightning.loggers import WandbLogger
        config = flatten(OmegaConf.to_container(cfg, resolve=True))
        name = identity.name if job_type == "finetune" else f"{job_type}: {identity.name}"
        logger = WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, name=name, group=identity.group,
                             job_type=job_type, save_dir=save_dir, mode=wandb_mode(cfg.logger.mode), config=config)
        logger.experiment  # start the W&B run now, so a failure from here on is recorded in it
        return logger
    return None


def finish_logger(logger, failed: bool) -> None:
    """Close the logger's run; a failed job's W&B run is marked failed (exit code 1)."""
    if logger is None:
        return
    from pytorch_lightning.loggers import WandbLogger
    if isinstance(logger, WandbLogger):
        import wandb
        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
    else:
        logger.finalize("failed" if failed else "success")
