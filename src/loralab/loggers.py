"""The run's identity in a sweep, and the logger that records it (W&B by default).

W&B is offline unless the user has set it up, so it never waits for a network or
a login; every run is closed in a ``finally`` so the jobs of a multirun never
share a W&B run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from loralab.distributed import is_rank_zero
from loralab.files import write_atomic
from loralab.layout import SEED_KEY, swept_keys
from loralab.overrides import sweep_label, without_resume
from loralab.provenance import provenance
from loralab.wandb_setup import start_wandb
from loralab.wandb_sweep import sweep_group


@dataclass
class RunIdentity:
    name: str  # the job's swept overrides, e.g. "lora.rank=4"
    group: str | None  # the sweep, for multirun jobs: its experiment (or "sweep") and its directory's date/time
    overrides: list[str]
    setting_id: str  # equal for runs that differ only in seed (see setting_id)


WANDB_RUN_ID = "wandb-run-id"  # in the run's checkpoint directory

# what does not change what a run computes: left out of its setting id
NOT_A_SETTING = (SEED_KEY, "paths", "logger", "checkpoint", "resume")


def setting_id(cfg: DictConfig) -> str:
    """A short hash of the resolved config without the seed, paths and logger: the runs of
    one setting share it across seeds (group by it in W&B for mean ± band)."""
    setting = OmegaConf.masked_copy(cfg, [key for key in cfg if key not in NOT_A_SETTING])
    blob = json.dumps(OmegaConf.to_container(setting, resolve=True), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def run_identity(cfg: DictConfig) -> RunIdentity:
    setting = setting_id(cfg)
    if not HydraConfig.initialized():  # composed without @hydra.main (e.g. the compose API)
        return RunIdentity(name=Path(cfg.paths.output_dir).name, group=None, overrides=[], setting_id=setting)
    hydra = HydraConfig.get()
    overrides = without_resume(hydra.overrides.task)  # how a run was started is not what it is
    if hydra.mode != RunMode.MULTIRUN:
        return RunIdentity(name=hydra.job.override_dirname or "default", group=None, overrides=overrides,
                           setting_id=setting)
    swept = swept_keys(hydra.sweep.dir, sweeper_params=hydra.sweeper.get("params"))
    return RunIdentity(name=sweep_label(overrides, swept) or hydra.job.override_dirname or "default",
                       group=sweep_group(hydra), overrides=overrides, setting_id=setting)


def flatten(config: dict, prefix: str = "") -> dict:
    """{"lora": {"rank": 4}} -> {"lora.rank": 4}, so W&B can group and filter by each key."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def make_logger(cfg: DictConfig, identity: RunIdentity, job_type: str, checkpoint_dir: Path,
                resumed_at: int | None = None):
    """The Lightning logger ``cfg.logger`` names, or None. A run resumed from a checkpoint of
    step ``resumed_at`` keeps what it logged up to that step, and only that: a W&B run keeps
    its id beside the run's checkpoints and goes on logging into the same W&B run; a CSV log
    keeps its rows; TensorBoard hides what the killed run logged from that step on."""
    kind, save_dir = cfg.logger.kind, cfg.paths.output_dir
    if kind == "csv":
        return resumable_csv_logger(save_dir, job_type, cfg.checkpoint.every_n_steps, resumed_at)
    if kind == "tensorboard":
        from pytorch_lightning.loggers import TensorBoardLogger
        return TensorBoardLogger(save_dir, name="tensorboard", version=job_type, purge_step=resumed_at)
    if kind == "wandb" and not is_rank_zero():
        return None  # one W&B run per job: the other DDP ranks log nothing
    if kind == "wandb":
        from pytorch_lightning.loggers import WandbLogger
        name = cfg.logger.name or identity.name
        # Started here, not by WandbLogger: it would pass anonymous=None, which W&B warns about on
        # every run; quiet: no run history and summary on the console (loralab prints its own line).
        # Starting now also records a failure from here on in the run. The run id is kept beside
        # the checkpoints, so a resumed run continues the same W&B run.
        run = start_wandb(cfg.logger.mode, project=cfg.logger.project, entity=cfg.logger.entity,
                          name=name if job_type == "finetune" else f"{job_type}: {name}",
                          group=cfg.logger.group or identity.group, tags=list(cfg.logger.tags) or None,
                          notes=cfg.logger.notes, job_type=job_type, dir=save_dir, config=wandb_config(cfg, identity),
                          id=wandb_run_id(Path(checkpoint_dir) / WANDB_RUN_ID), resume="allow")
        define_metrics(run)
        return WandbLogger(experiment=run, save_dir=save_dir)
    return None


def wandb_config(cfg: DictConfig, identity: RunIdentity) -> dict:
    """The run's W&B config: the resolved config, flattened, without the keys that do not
    apply to it (a full fine-tuning run has no ``lora.*``; a GPT no ViT-only ``model.*`` and
    a ViT no GPT-only ones), so grouping by a key never mixes in runs it means nothing to."""
    config = OmegaConf.to_container(cfg, resolve=True)
    if not cfg.lora.enabled:
        del config["lora"]
    for key in keys_of_other_models(cfg.model.kind):
        config["model"].pop(key, None)
    return {**flatten(config), "setting_id": identity.setting_id, **flatten(provenance(cfg.trainer), "provenance.")}


def keys_of_other_models(kind: str) -> set[str]:
    """The ``model.*`` keys only the other model kind reads (ViT: image_size, patch_size, ...)."""
    from loralab.model import GPTConfig
    from loralab.vit import ViTConfig

    gpt = {f.name for f in fields(GPTConfig)} | {"pretrained"}  # a Hugging Face GPT-2 directory
    vit = {f.name for f in fields(ViTConfig)}
    return vit - gpt if kind == "gpt" else gpt - vit


def define_metrics(run) -> None:
    """What WandbLogger declares only for a run it starts itself: every metric against the
    trainer's step (not W&B's own step, which also counts the logging of the summaries), and
    summaries with intent: val/loss is the final whole-split value, best/val_loss the lowest."""
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    run.define_metric("val/loss", step_metric="trainer/global_step", summary="last")
    run.define_metric("best/val_loss", summary="min")


def log_adapter(logger, cfg: DictConfig, adapter_dir: Path, base_sha256: str) -> None:
    """The saved adapter as a W&B artifact of type ``lora-adapter`` (kilobytes), its
    adapter_config.json as metadata beside the SHA-256 of the base it belongs on."""
    from pytorch_lightning.loggers import WandbLogger
    if not isinstance(logger, WandbLogger) or not cfg.logger.log_adapter:
        return
    import wandb
    run = logger.experiment
    metadata = {**json.loads((adapter_dir / "adapter_config.json").read_text()), "base_sha256": base_sha256}
    artifact = wandb.Artifact(f"adapter-{run.id}", type="lora-adapter", metadata=metadata)
    artifact.add_dir(str(adapter_dir))
    run.log_artifact(artifact)


def resumable_csv_logger(save_dir: str, job_type: str, every_n_steps: int, resumed_at: int | None):
    """Lightning's CSVLogger, written out at every checkpoint, so that the file holds every step
    a checkpoint holds. A run resumed at step ``resumed_at`` starts from the rows before that
    step (Lightning's writer deletes the file it finds)."""
    from pytorch_lightning.loggers import CSVLogger
    logger = CSVLogger(save_dir, name="csv", version=job_type, flush_logs_every_n_steps=every_n_steps)
    path = Path(logger.log_dir) / "metrics.csv"
    if resumed_at is not None and path.is_file() and is_rank_zero():
        with path.open(newline="") as f:
            rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
        logger.experiment.metrics.extend(row for row in rows if int(row["step"]) < resumed_at)
    return logger


def wandb_run_id(path: Path) -> str:
    """The W&B run id kept in ``path``; a new one, kept there, for a run that has none."""
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:8]  # W&B's own ids are 8 characters of [a-z0-9]
    write_atomic(path, run_id.encode())
    return run_id


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
