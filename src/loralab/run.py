"""One run, composed from a config, top to bottom:

    config ─► validate ─► base model (load, or pretrain once and cache) ─► seed ─►
    data ─► inject LoRA ─► Trainer.fit ─► evaluate ─► adapter + summary.json ─►
    close the logger ─► return the objective (best val/loss)

A run knows nothing of sweeps: the sweep report is a Hydra callback's job
(``loralab.report.SweepReport``).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from torch.utils.data import DataLoader

from loralab.adapters import save_adapter
from loralab.base import BaseIdentity, cached_base, load_base, weights_sha256
from loralab.base_evals import BaseEvaluations, split_key
from loralab.callbacks import (
    AdapterAnalysis,
    History,
    MergeCheck,
    ParameterCount,
    Recorded,
    StepProgressBar,
    Throughput,
    log_to_loggers,
)
from loralab.checkpoints import (
    AtomicCheckpointIO,
    LastCheckpoint,
    checkpoint_step,
    discard_unreadable_checkpoint,
    last_checkpoint,
)
from loralab.config import ConfigError, lora_config_of, model_config_of, validate
from loralab.console import silence_known_noise
from loralab.data import SeededDataModule, tokenizer_of
from loralab.distributed import ReplicaCheck, end_process_group, is_rank_zero, run_only_this_job
from loralab.gpt2 import load_gpt2
from loralab.interrupts import (
    INTERRUPTIONS,
    Interrupted,
    StopOnInterrupt,
    catch_interrupts,
    interruption,
    stop_if_interrupted,
)
from loralab.layout import CHECKPOINTS_DIR, adapter_dir, finished_summary, write_summary
from loralab.loggers import RunIdentity, finish_logger, log_adapter, make_logger, run_identity
from loralab.lora import LoRAConfig, inject_lora
from loralab.model import GPT
from loralab.model_kinds import KINDS, ModelKind, build_model, kind_of, replace_head
from loralab.module import LitTransformer
from loralab.provenance import provenance
from loralab.sweep_console import where_results
from loralab.vit import ViT

log = logging.getLogger(__name__)


def train(cfg: DictConfig, packed: bool = False) -> float:
    """Fine-tune one run as ``cfg`` describes; return its best val/loss (+inf if it diverged).
    ``packed``: the run was trained in a pack (``loralab.pack_sweep``), which left its checkpoint."""
    silence_known_noise()
    catch_interrupts()
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    identity = run_identity(cfg)
    finished = finished_summary(run_dir) if cfg.resume else None
    if finished is not None:
        log.info("%s already %s: left as it is (resume=true)", run_dir, finished["status"])
        print_result(finished)
        return finished["metrics"]["best/val_loss"]
    started = time.time()
    summary = {"status": "failed", "error": None, "name": identity.name, "overrides": identity.overrides,
               "setting_id": identity.setting_id}
    try:
        stop_if_interrupted()  # a sweep's next job, after a signal
        validate(cfg)
        run_only_this_job(cfg.trainer)
        model, base = base_model(cfg, identity)
        summary["base"] = base.to_dict()
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        kind = kind_of(model)
        data = kind.data_module(cfg.data, cfg.seed, model.config, tokenizer_of(cfg.model.pretrained))
        if kind.new_head:  # the base's head classified other classes: a new one, from this seed
            replace_head(model)
        held_out = {"test": data.test_dataloader(), **source_held_out(cfg, model)}
        lora_config = lora_config_of(cfg.lora)
        if lora_config is not None:
            adapted = inject_lora(model, lora_config)
            log.info("LoRA r=%d on %d modules: %s", lora_config.rank, len(adapted), ", ".join(adapted))

        def keep_adapter(logger) -> None:  # while the logger is open: the adapter is also a W&B artifact
            if lora_config is not None and is_rank_zero():
                saved = save_adapter(model, lora_config, adapter_dir(run_dir), base=base.to_dict())
                log_adapter(logger, cfg, saved, base.sha256)

        evals = BaseEvaluations(to_absolute_path(cfg.paths.cache_dir), base.sha256) \
            if computes_its_base(kind, lora_config) else None
        result = fit(cfg, model, data, identity, job_type="finetune", optim=cfg.optim,
                     checkpoint_dir=run_dir / CHECKPOINTS_DIR, resume=cfg.resume or packed, held_out=held_out,
                     on_completed=keep_adapter, base_evals=evals)
        summary.update(result)
        # +inf, not NaN, when it diverged: a search ranks it last (Optuna 2.10 refuses a NaN
        # objective, and hydra-optuna-sweeper then stops the whole search)
        return summary["metrics"]["best/val_loss"] if summary["status"] == "completed" else math.inf
    except INTERRUPTIONS:
        summary["status"] = "interrupted"
        summary["error"] = f"stopped by {interruption()}: resume=true continues it from its last checkpoint"
        raise Interrupted() from None
    except Exception as e:
        summary["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        end_process_group()
        if is_rank_zero():  # the other DDP ranks trained the same adapter; one of them records it
            summary["wall_time_s"] = time.time() - started
            summary["config"] = OmegaConf.to_container(cfg, resolve=False)
            summary["provenance"] = provenance(cfg.trainer)
            write_summary(run_dir, summary)
            if not (summary["error"] or "").startswith(ConfigError.__name__):  # its lines alone say it (exits.py)
                print_result(summary)
                if identity.group is None:  # a sweep says where its results are once, at its end
                    print(where_results(run_dir, "wandb/offline-run-*"), flush=True)


def base_model(cfg: DictConfig, identity: RunIdentity) -> tuple[GPT | ViT, BaseIdentity]:
    """The base model and its identity: a Hugging Face GPT-2 directory, a given checkpoint,
    or the cached pretraining for these settings (a ViT pretrains on ``base.corpus``'s digits)."""
    if cfg.model.pretrained:
        model = load_gpt2(cfg.model.pretrained, dropout=cfg.model.dropout)
        return model, BaseIdentity("gpt2", str(Path(cfg.model.pretrained).resolve()), weights_sha256(model))
    if cfg.base.checkpoint:
        model, sha256 = load_base(cfg.base.checkpoint)
        return model, BaseIdentity("checkpoint", str(Path(cfg.base.checkpoint).resolve()), sha256)
    model_config = model_config_of(cfg.model)
    data = KINDS[cfg.model.kind].data_module(cfg.base, cfg.base.seed, model_config)

    def pretrain(checkpoint_dir: Path) -> GPT | ViT:
        unreadable = discard_unreadable_checkpoint(checkpoint_dir)
        if unreadable:
            log.warning("%s: the pretraining starts over", unreadable)
        pl.seed_everything(cfg.base.seed, workers=True, verbose=False)
        model = build_model(model_config)
        optim = {"lr": cfg.base.lr, "warmup_steps": cfg.base.warmup_steps}
        fit(cfg, model, data, identity, job_type="pretrain", optim=optim, max_steps=cfg.base.steps,
            checkpoint_dir=checkpoint_dir, resume=True)  # a killed pretraining always goes on: same settings
        return model

    # absolute, so that jobs on any launcher (whatever their working directory) share one cache
    return cached_base(model_config, cfg.base, data.fingerprint, to_absolute_path(cfg.paths.cache_dir), pretrain)


def computes_its_base(kind: ModelKind, lora_config: LoRAConfig | None) -> bool:
    """Whether the model, before training, computes exactly its base, so that the base's cached
    evaluations are its own: not with a new head, a quantized base, DoRA's or PiSSA's start."""
    if kind.new_head:
        return False
    return lora_config is None or (lora_config.quantize == "none" and not lora_config.dora
                                   and lora_config.init != "pissa")


def source_held_out(cfg: DictConfig, model: GPT | ViT) -> dict[str, DataLoader]:
    """{"forget": the held-out part of the corpus the base was pretrained on}, where forgetting
    is measured (Biderman et al. 2024, "LoRA Learns Less and Forgets Less", §4); {} for a
    GPT-2 base (pretrained on text we do not hold) and a model whose head fine-tuning replaces
    (a ViT: the head for its source classes is gone)."""
    kind = kind_of(model)
    if cfg.model.pretrained or kind.new_head:
        return {}
    return {"forget": kind.data_module(cfg.base, cfg.base.seed, model.config).val_dataloader()}


def fit(cfg: DictConfig, model: GPT | ViT, data: SeededDataModule, identity: RunIdentity, job_type: str,
        optim, checkpoint_dir: Path, resume: bool, max_steps: int | None = None,
        held_out: dict[str, DataLoader] | None = None, on_completed: Callable | None = None,
        base_evals: BaseEvaluations | None = None) -> dict:
    """Train ``model``'s trainable parameters; validate before and after, and evaluate each
    ``held_out`` split ("test", "forget") before and after. Checkpoints go to
    ``checkpoint_dir``; with ``resume`` training continues from the last one there; a run that
    completed is handed, with its logger, to ``on_completed`` before the logger closes. Returns
    the run's status, metrics and loss history, which also go to the logger's summary.
    ``base_evals``: the base's cached evaluations, for a model that computes exactly its base."""
    held_out = held_out or {}
    max_steps = max_steps or cfg.trainer.max_steps
    count, throughput, merge_check, history = ParameterCount(), Throughput(), MergeCheck(cfg.merge_tolerance), History()
    replicas, analysis, recorded = ReplicaCheck(), AdapterAnalysis(), Recorded()
    checkpoints = LastCheckpoint(checkpoint_dir, cfg.checkpoint.every_n_steps)
    callbacks = [StopOnInterrupt(), count, throughput, replicas, merge_check, history, checkpoints, analysis,
                 recorded]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar(job_type))
    resume_from = last_checkpoint(checkpoint_dir) if resume else None
    module = LitTransformer(model, max_steps=max_steps, **optim)
    resumed_at = checkpoint_step(resume_from) if resume_from else None
    logger = make_logger(cfg, identity, job_type, checkpoint_dir, resumed_at)
    if logger is not None:  # the schedule's learning rate at every step, as lr-AdamW
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer_args = {**cfg.trainer, "max_steps": max_steps}
    if job_type == "pretrain":  # in one process, before DDP starts the other ranks (they wait on its cache)
        trainer_args.update(strategy="auto", devices=1, num_nodes=1)
    status = "failed"
    try:
        trainer = pl.Trainer(**trainer_args, logger=logger or False, callbacks=callbacks,
                             plugins=[AtomicCheckpointIO()], check_val_every_n_epoch=None, num_sanity_val_steps=0,
                             inference_mode=False, enable_model_summary=False, default_root_dir=cfg.paths.output_dir)
        # on resume too, for the summary (the model is still the untrained one); its loggers have it
        base, base_held_out = evaluate_before(trainer, module, data, held_out, base_evals, log=resumed_at is None)
        history.history["val/loss"] = [[0, base["val/loss"]]]
        if resume_from:
            log.info("Resuming %s from %s", job_type, resume_from)
        trainer.fit(module, data, ckpt_path=resume_from)
        final = evaluate(trainer, module, data)
        held_out_metrics = held_out_summary(base_held_out, evaluate_held_out(trainer, module, held_out), held_out)
        log_to_loggers(trainer, held_out_metrics)
        # a run that stopped short, or resumed from a checkpoint past a lower max_steps, is not what was asked
        off = None if trainer.global_step == max_steps else f"trained {trainer.global_step} steps of {max_steps} asked"
        diverged = module.diverged or not math.isfinite(final["val/loss"])
        status = "diverged" if diverged else "failed" if off else "completed"
        tuned = [v for _, v in history.history["val/loss"][1:]]  # the first entry is the base
        metrics = {
            "val/loss": final["val/loss"], "val/ppl": final["val/ppl"], "val/acc": final["val/acc"],
            "best/val_loss": min(tuned + [final["val/loss"]]),
            "base/val_loss": base["val/loss"], "base/val_ppl": base["val/ppl"], "base/val_acc": base["val/acc"],
            "gain/val_loss": base["val/loss"] - final["val/loss"],
            "train/loss": history.history["train/loss"][-1][1] if history.history["train/loss"] else None,
            "val/tokens": len(data.val_set) * data.block_size,  # what base/ and the final val/ numbers cover
            **held_out_metrics, **count.metrics, **throughput.metrics, **merge_check.metrics, **replicas.metrics,
            **analysis.metrics,
        }
        result = {"status": status, "error": off, "job_type": job_type, "steps": trainer.global_step,
                  "metrics": metrics, "history": history.history, "analysis": analysis.layers}
        if logger is not None and cfg.logger.kind == "wandb" and is_rank_zero():  # other ranks hold a dummy run
            logger.experiment.summary.update({**metrics, "status": status})
        if status == "completed" and on_completed is not None:
            on_completed(logger)
        return result
    finally:
        finish_logger(logger, failed=status == "failed")


def evaluate_before(trainer: pl.Trainer, module: LitTransformer, data: SeededDataModule,
                    held_out: dict[str, DataLoader], base_evals: BaseEvaluations | None,
                    log: bool) -> tuple[dict, dict]:
    """The untrained model's val/ metrics and held-out losses on the whole splits, each read from
    ``base_evals`` when it holds it (else computed, and kept there); logged as the validation at step 0.
    The random state is left as it was: each DataLoader draws a seed from it, and a run that
    computes its base's evaluations must train exactly as one that finds them cached."""
    cached = base_evals.get if base_evals is not None else lambda key, compute: compute()
    with torch.random.fork_rng(devices=[]):
        val = cached(split_key("val", data.val_set, data.batch_size),
                     lambda: evaluate(trainer, module, data, log=False))
        losses = {split: cached(split_key(split, loader.dataset, loader.batch_size),
                                lambda loader=loader: {"loss": held_out_loss(trainer, module, loader)})["loss"]
                  for split, loader in held_out.items()}
    if log:
        log_to_loggers(trainer, {**val, "epoch": 0})
    return val, losses


def evaluate(trainer: pl.Trainer, module: LitTransformer, data: SeededDataModule, log: bool = True) -> dict:
    """val/ metrics on the whole held-out split; validation during training sees only
    ``trainer.limit_val_batches`` of it, for speed."""
    subsample, trainer.limit_val_batches = trainer.limit_val_batches, 1.0
    loggers, trainer.loggers = trainer.loggers, trainer.loggers if log else []
    try:
        return trainer.validate(module, data, verbose=False)[0]
    finally:
        trainer.limit_val_batches, trainer.loggers = subsample, loggers


def evaluate_held_out(trainer: pl.Trainer, module: LitTransformer, held_out: dict[str, DataLoader]) -> dict[str, float]:
    """The model's loss on each named held-out split, whole."""
    return {split: held_out_loss(trainer, module, loader) for split, loader in held_out.items()}


def held_out_loss(trainer: pl.Trainer, module: LitTransformer, loader: DataLoader) -> float:
    """Mean loss over the whole of ``loader``; kept from the loggers, which get it by its own name."""
    loggers, trainer.loggers = trainer.loggers, []
    try:
        return trainer.test(module, dataloaders=loader, verbose=False)[0]["held_out/loss"]
    finally:
        trainer.loggers = loggers


def held_out_summary(before: dict[str, float], after: dict[str, float], held_out: dict[str, DataLoader]) -> dict:
    """test/loss and base/test_loss; forget/loss, base/forget_loss and forget/increase (after −
    before: how much of its own domain the base lost); and the tokens each covers."""
    metrics = {}
    for split in before:
        dataset = held_out[split].dataset
        tokens = len(dataset) * getattr(dataset, "block_size", 1)  # text windows, or images
        metrics |= {f"{split}/loss": after[split], f"base/{split}_loss": before[split], f"{split}/tokens": tokens}
    if "forget" in before:
        metrics["forget/increase"] = after["forget"] - before["forget"]
    return metrics


def print_result(summary: dict) -> None:
    m = summary.get("metrics", {})
    line = f"[loralab] {summary['name']}: {summary['status']}"
    if "val/loss" in m:
        line += f" | val/loss {m['val/loss']:.4f} (base {m['base/val_loss']:.4f}, gain {m['gain/val_loss']:+.4f})"
        for name in ("test/loss", "forget/increase"):  # absent from runs recorded before them, and forget from GPT-2's
            if name in m:
                line += f" | {name} {m[name]:{'+' if name.startswith('forget') else ''}.4f}"
        line += (f" | trainable {m['params/trainable']:,} ({m['params/trainable_pct']:.2f}%)")
        if "lora/merge_max_abs_diff" in m:
            line += f" | merge diff {m['lora/merge_max_abs_diff']:.1e} {'ok' if m['lora/merge_ok'] else 'FAILED'}"
    if summary["error"]:
        line += f" | {summary['error']}"
    print(f"{line} | {summary['wall_time_s']:.1f} s", flush=True)
