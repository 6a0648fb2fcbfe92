"""A sweep's LoRA jobs trained in packs (``hydra/launcher=packed``), each job still one run.

Jobs that share their base, model, data and trainer settings train as one ``loralab.packed.Pack``:
one frozen base over their stacked batches, each job with its own adapter, optimizer, schedule,
clipping, data order (its seed's, as its solo run draws it) and validation curve. A job leaves
the pack as a Lightning checkpoint in its own run directory, ``checkpoints/last.ckpt``, in exactly
the form its solo run writes: the adapter, the optimizer and schedule, the fit loop's progress, the
data position, the loss history and step times. Each job then runs as its solo run does
(``loralab.run.train`` with ``packed=True``), continuing from that checkpoint: there is nothing
left to train, so it evaluates, checks the merge, analyses and saves its adapter, writes its
summary and logs its W&B run by the one code path every run takes. A job whose loss stops being
finite leaves the pack at its last good step; continuing from there, its run finds the same
non-finite loss and ends ``diverged``, as it would alone.

The checkpoints are also the pack's: a killed pack, resumed (``resume=true``), takes every job
from its own checkpoint (read with ``weights_only=True``), a solo run's as well as a pack's.
SIGTERM or SIGINT stops the pack at the end of a step, every job checkpointed there.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytorch_lightning as pl
import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from loralab.base_evals import BaseEvaluations, split_key
from loralab.checkpoints import LAST, AtomicCheckpointIO, last_checkpoint
from loralab.config import lora_config_of
from loralab.data import ResumableLoader, tokenizer_of
from loralab.interrupts import Interrupted, catch_interrupts, stop_if_interrupted
from loralab.layout import CHECKPOINTS_DIR
from loralab.loggers import run_identity
from loralab.memory import available_memory_mb
from loralab.model_kinds import KINDS
from loralab.module import rng_states
from loralab.packed import JobSpec, Pack, unpackable

log = logging.getLogger(__name__)

PER_JOB_TRAINER = {"gradient_clip_val"}  # the trainer keys each job of a pack keeps its own of
SHARED = ("model", "data", "base", "trainer", "checkpoint", "paths.cache_dir")  # equal within a pack
PACKED_PRECISIONS = ("32-true", "32", 32)


def why_alone(cfg: DictConfig) -> str | None:
    """Why this job cannot train in a pack (it then runs on its own), or None."""
    if not cfg.lora.enabled:
        return "lora=full trains every weight"
    if cfg.model.kind != "gpt":
        return f"model.kind={cfg.model.kind!r} is not packed"
    if cfg.optim.lora_plus_ratio != 1:
        return f"optim.lora_plus_ratio={cfg.optim.lora_plus_ratio} is not packed"
    trainer = cfg.trainer
    if trainer.get("precision", "32-true") not in PACKED_PRECISIONS:
        return f"trainer.precision={trainer.precision!r} is not packed (float32 only)"
    if trainer.get("devices", 1) not in (1, "1", "auto") or trainer.get("num_nodes", 1) != 1:
        return "a job on several devices is not packed"
    if trainer.get("gradient_clip_algorithm", "norm") != "norm":
        return f"trainer.gradient_clip_algorithm={trainer.gradient_clip_algorithm!r} is not packed"
    return unpackable(lora_config_of(cfg.lora))


def shared_settings(cfg: DictConfig) -> str:
    """What the jobs of one pack have in common, as a key: base, model, data (with its batch
    size), trainer (steps, validation, precision, device; not the clipping) and checkpoints."""
    shared = {}
    for key in SHARED:
        node = OmegaConf.select(cfg, key)
        shared[key] = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    shared["trainer"] = {k: v for k, v in shared["trainer"].items() if k not in PER_JOB_TRAINER}
    return json.dumps(shared, sort_keys=True, default=str)


def activation_mb(cfg: DictConfig) -> float:
    """A rough bound on one job's share of a pack's memory: the activations its batch keeps for
    the backward pass, float32, per layer about 16 × n_embd (attention, MLP, norms) and
    2 × n_head × block_size (the attention scores) per position, and its logits."""
    m, rows = cfg.model, cfg.data.batch_size * cfg.model.block_size
    per_position = m.n_layer * (16 * m.n_embd + 2 * m.n_head * m.block_size) + 3 * m.vocab_size
    return 4 * rows * per_position / 2**20


def memory_bound(cfg: DictConfig) -> tuple[int | None, str]:
    """How many jobs like ``cfg`` fit in one pack within half the memory available now, and
    the line that says so (None, and why not, where the available memory is unknown)."""
    need, free = activation_mb(cfg), available_memory_mb(device_of(cfg.trainer))
    if free is None:
        return None, f"~{need:.0f} MB a job; the memory available is unknown here"
    fit = max(1, int(free / 2 // need))
    return fit, f"~{need:.0f} MB a job: {fit} fit in half of the {free:.0f} MB available"


def plan(configs: list[DictConfig], pack_size: int | None) -> tuple[list[list[int]], dict[int, str]]:
    """The packs (job indices, in job order, at most ``pack_size`` each, and no more than fit in
    memory, ``memory_bound``), and each job that runs alone with why. A job whose settings no
    other job shares runs alone too."""
    alone, groups = {}, {}
    for i, cfg in enumerate(configs):
        if reason := why_alone(cfg):
            alone[i] = reason
        else:
            groups.setdefault(shared_settings(cfg), []).append(i)
    packs = []
    for jobs in groups.values():
        fit, why = memory_bound(configs[jobs[0]])
        size = min(pack_size or len(jobs), fit or len(jobs))
        log.info("pack memory: %s", why)
        for start in range(0, len(jobs), size):
            chunk = jobs[start:start + size]
            if len(chunk) == 1:
                alone[chunk[0]] = "no other job shares its base, model, data and trainer settings"
            else:
                packs.append(chunk)
    return packs, dict(sorted(alone.items()))


def job_spec(cfg: DictConfig) -> JobSpec:
    """How the job's solo run trains (``LitTransformer``'s optimizer and schedule, Lightning's clipping)."""
    o = cfg.optim
    return JobSpec(lora_config_of(cfg.lora), seed=cfg.seed, lr=o.lr, max_steps=cfg.trainer.max_steps,
                   weight_decay=o.weight_decay, betas=tuple(o.betas), warmup_steps=o.warmup_steps,
                   min_lr_ratio=o.min_lr_ratio, gradient_clip_val=cfg.trainer.get("gradient_clip_val"))


@dataclass
class PackedJob:
    """One job's place in the pack's loop: its step, data position, and what its solo run's
    callbacks would have recorded (``History``, ``Throughput``)."""

    name: str
    run_dir: Path
    spec: JobSpec
    loader: ResumableLoader
    step: int = 0
    batches: Iterator | None = None
    history: dict = field(default_factory=lambda: {"train/loss": [], "val/loss": []})
    step_times: list[float] = field(default_factory=list)
    tokens: int = 0
    rows: list = field(default_factory=list)  # what its solo run logs as it trains (``Recorded``)
    diverged: bool = False

    @property
    def max_steps(self) -> int:
        return self.spec.max_steps

    def epoch(self, step: int) -> int:
        """The epoch of its data that step ``step`` (from 0) draws from (Lightning's ``epoch``)."""
        return step // len(self.loader)

    def next_batch(self):
        """The batch its solo run takes next: epoch after epoch of its own seeded shuffle."""
        if self.batches is None:  # from its data position (a resumed job: not the start)
            per_epoch = len(self.loader)
            self.loader.load_state_dict({"epoch": self.step // per_epoch, "batches": self.step % per_epoch,
                                         "per_epoch": per_epoch})
            self.batches = iter(self.loader)
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)


def device_of(trainer: DictConfig) -> torch.device:
    wants_gpu = trainer.get("accelerator", "cpu") in ("gpu", "cuda", "auto")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def train_pack(configs: list[DictConfig], run_dirs: list[Path], resume: bool) -> None:
    """Train the jobs ``configs`` (run in ``run_dirs``) as one pack, leaving each job's checkpoint
    in its run directory. With ``resume``, each job goes on from the checkpoint it has."""
    from loralab.run import base_model  # the one way a base is found or pretrained

    catch_interrupts()
    cfg = configs[0]
    model, base = base_model(cfg, run_identity(cfg))
    device = device_of(cfg.trainer)
    model.to(device)
    kind = KINDS[cfg.model.kind]
    data = kind.data_module(cfg.data, cfg.seed, model.config, tokenizer_of(cfg.model.pretrained))
    jobs = [PackedJob(d.name, d, job_spec(c), ResumableLoader(data.train_set, data.batch_size, c.seed, progress=dict))
            for c, d in zip(configs, run_dirs)]
    pack = Pack(model, {j.name: j.spec for j in jobs})
    if resume:
        for job in jobs:
            restore(pack, job, device)
    if any(j.step == 0 for j in jobs):  # the base's, as every run on it reads it (a packed job computes its base)
        base_val = BaseEvaluations(to_absolute_path(cfg.paths.cache_dir), base.sha256).get(
            split_key("val", data.val_set, data.batch_size), lambda: whole_val(pack, jobs[0].name, data, device))
    for job in jobs:
        if job.step == 0:  # as the solo run's validation before training
            job.history["val/loss"] = [[0, base_val["val/loss"]]]
            job.rows.append([0, {**base_val, "epoch": 0}])
    log.info("Training %d jobs as one pack: %s", len(jobs), ", ".join(str(d) for d in run_dirs))
    val_batches = limited(data.val_dataloader(), cfg.trainer.get("limit_val_batches", 1.0))
    every_val = cfg.trainer.get("val_check_interval")  # steps (loralab's Trainer counts batches across epochs)
    active = [j for j in jobs if j.step < j.max_steps]
    while active:
        train_together(pack, active, device)
        due = [j for j in active if not j.diverged and isinstance(every_val, int) and j.step % every_val == 0]
        if due:
            metrics = pack.evaluate([j.name for j in due], moved(val_batches, device))
            for job in due:  # logged at the step of the batch it follows, as Lightning does
                job.history["val/loss"].append([job.step, metrics[job.name]["val/loss"]])
                job.rows.append([job.step - 1, {**metrics[job.name], "epoch": job.epoch(job.step - 1)}])
        for job in active:
            if job.diverged or job.step % cfg.checkpoint.every_n_steps == 0 or job.step == job.max_steps:
                save_job_checkpoint(pack, job)
        try:
            stop_if_interrupted()  # SIGTERM / SIGINT stop the pack here, at a step boundary
        except Interrupted:
            for job in active:
                save_job_checkpoint(pack, job)
            raise
        active = [j for j in active if not j.diverged and j.step < j.max_steps]


def train_together(pack: Pack, jobs: list[PackedJob], device: torch.device) -> None:
    """One step of every job; a job whose loss is not finite is marked diverged at its last good step."""
    batches = {j.name: tuple(t.to(device) for t in j.next_batch()) for j in jobs}
    lrs = {j.name: pack.optimizers[j.name].param_groups[0]["lr"] for j in jobs}  # this step's (LearningRateMonitor)
    started = time.perf_counter()
    losses = pack.train_step(batches)
    share = (time.perf_counter() - started) / len(jobs)  # each job's part of the pack's step
    for job in jobs:
        loss = losses[job.name]
        if not math.isfinite(loss):
            job.diverged = True
            log.warning("job %s diverged at step %d (train/loss %s): it leaves the pack", job.name, job.step + 1, loss)
            continue
        tokens = batches[job.name][0].numel()
        job.rows += [[job.step, {"lr-AdamW": lrs[job.name]}],
                     [job.step, {"train/loss": loss, "perf/step_s": share, "perf/tokens_per_s": tokens / share,
                                 "epoch": job.epoch(job.step)}]]
        job.step += 1
        job.history["train/loss"].append([job.step, loss])
        job.step_times.append(share)
        if len(job.step_times) > 1:  # as Throughput: the first step is warm-up
            job.tokens += tokens


def limited(loader, limit: int | float) -> list:
    """The first batches of ``loader`` that Lightning's ``limit_val_batches`` validates on."""
    n = limit if isinstance(limit, int) else int(len(loader) * limit)
    return [batch for _, batch in zip(range(n), loader)]


def moved(batches, device: torch.device):
    return ((x.to(device), y.to(device)) for x, y in batches)


def whole_val(pack: Pack, name: str, data, device: torch.device) -> dict[str, float]:
    """The base's val/ metrics on the whole split: any job's before its first step (B = 0)."""
    return pack.evaluate([name], moved(data.val_dataloader(), device))[name]


def restore(pack: Pack, job: PackedJob, device: torch.device) -> None:
    """Job ``job`` from its checkpoint, if it has one (a pack's or its solo run's)."""
    path = last_checkpoint(job.run_dir / CHECKPOINTS_DIR)
    if path is None:
        return
    checkpoint = AtomicCheckpointIO().load_checkpoint(path, map_location=device)
    adapter = {key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()}
    pack.load_job_state(job.name, {"adapter": adapter, "optimizer": checkpoint["optimizer_states"][0],
                                   "scheduler": checkpoint["lr_schedulers"][0]})
    callbacks = checkpoint.get("callbacks", {})
    job.history = callbacks["History"]
    throughput = callbacks.get("Throughput", {"step_times": [], "tokens": 0})
    job.step_times, job.tokens = list(throughput["step_times"]), throughput["tokens"]
    job.rows = callbacks.get("Recorded", {"rows": []})["rows"]
    job.step = int(checkpoint["global_step"])
    log.info("job %s goes on from %s (step %d)", job.name, path, job.step)


def save_job_checkpoint(pack: Pack, job: PackedJob) -> None:
    """Job ``job``'s state as the Lightning checkpoint its solo run would hold at this step."""
    state = pack.job_state(job.name)
    per_epoch = len(job.loader)
    epoch, batches = divmod(job.step, per_epoch)
    epoch += job.step == job.max_steps  # Lightning closes the epoch that training ends in
    checkpoint = {
        "epoch": epoch, "global_step": job.step, "pytorch-lightning_version": pl.__version__,
        "state_dict": {f"model.{key}": value for key, value in state["adapter"].items()},
        "loops": {"fit_loop": fit_loop_state(job.step, epoch, batches, per_epoch)},
        "callbacks": {"History": job.history, "Throughput": {"step_times": job.step_times, "tokens": job.tokens},
                      "Recorded": {"rows": job.rows}},
        "optimizer_states": [state["optimizer"]], "lr_schedulers": [state["scheduler"]],
        "rng_states": rng_states(),
    }
    AtomicCheckpointIO().save_checkpoint(checkpoint, job.run_dir / CHECKPOINTS_DIR / LAST)


def fit_loop_state(step: int, epoch: int, batches: int, per_epoch: int) -> dict:
    """Lightning's fit loop after ``step`` optimizer steps, one per batch (``_FitLoop.state_dict``)."""
    def progress(total: int, current: int, keys=("ready", "completed", "started", "processed")) -> dict:
        return {"total": dict.fromkeys(keys, total), "current": dict.fromkeys(keys, current)}

    steps = progress(step, batches, ("ready", "completed"))
    zero_grad = progress(step, batches, ("ready", "completed", "started"))
    return {
        "state_dict": {"combined_loader": [{"epoch": epoch, "batches": batches, "per_epoch": per_epoch}]},
        "epoch_loop.state_dict": {"_batches_that_stepped": step},
        "epoch_loop.batch_progress": {**progress(step, batches), "is_last_batch": False},
        "epoch_loop.scheduler_progress": steps,
        "epoch_loop.automatic_optimization.state_dict": {},
        "epoch_loop.automatic_optimization.optim_progress": {"optimizer": {"step": steps, "zero_grad": zero_grad}},
        "epoch_loop.manual_optimization.state_dict": {},
        "epoch_loop.manual_optimization.optim_step_progress": progress(0, 0, ("ready", "completed")),
        "epoch_loop.val_loop.state_dict": {},
        "epoch_loop.val_loop.batch_progress": {**progress(0, 0), "is_last_batch": False},
        "epoch_progress": {"total": {"ready": epoch + 1, "completed": epoch, "started": epoch + 1,
                                     "processed": epoch},
                           "current": {"ready": epoch + 1, "completed": epoch, "started": epoch + 1,
                                       "processed": epoch}},
    }
