"""Callbacks that measure a run: parameter counts, throughput, the merge check, history.

Each keeps what it measured in ``metrics`` (the metric names of summary.json, W&B and the report) so that
the run's ``summary.json`` and the loggers see the same numbers.
"""

from __future__ import annotations

import copy
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import _update_n, convert_inf

from loralab.lora import analytic_lora_parameters, count_parameters, lora_layers, merge_lora
from loralab.memory import peak_memory_mb, reset_peak_memory
from loralab.model_kinds import kind_of


def log_to_loggers(trainer: pl.Trainer, metrics: dict) -> None:
    """For hooks where ``LightningModule.log`` is not allowed (fit start and end)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


class ParameterCount(pl.Callback):
    """params/trainable, params/total, params/trainable_pct, and LoRA's analytic Σ r·(in + out)."""

    def __init__(self):
        self.metrics: dict = {}
        self.logged = False  # kept in checkpoints: a resumed run's loggers have them from before the kill

    def state_dict(self) -> dict:
        return {"logged": self.logged}

    def load_state_dict(self, state_dict: dict) -> None:
        self.logged = state_dict["logged"]

    def on_fit_start(self, trainer, pl_module):
        trainable, total = count_parameters(pl_module.model)
        self.metrics = {"params/trainable": trainable, "params/total": total,
                        "params/trainable_pct": 100 * trainable / total,
                        "params/lora_analytic": analytic_lora_parameters(pl_module.model)}
        if not self.logged:
            log_to_loggers(trainer, self.metrics)
            self.logged = True


class Recorded(pl.Callback):
    """What a run recorded as it trained but did not log: rows of (logger step, metrics), logged
    as the fit starts. A pack's job (``loralab.pack_sweep``) trains outside its run's trainer;
    its checkpoint brings these rows, so its loggers get the curves a solo run logs."""

    def __init__(self):
        self.rows: list = []

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = state_dict["rows"]

    def on_fit_start(self, trainer, pl_module):
        for step, metrics in self.rows:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self.rows = []


class Throughput(pl.Callback):
    """perf/step_s and perf/tokens_per_s (positions, see ``ModelKind.positions``) per training
    step (averaged over the run in ``metrics``, the first step left out as warm-up), and
    perf/peak_mem_mb. The step times are kept in checkpoints: a resumed run's averages cover
    all its steps."""

    def __init__(self):
        self.metrics: dict = {}
        self.step_times: list[float] = []
        self.tokens = 0

    def state_dict(self) -> dict:
        return {"step_times": list(self.step_times), "tokens": self.tokens}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step_times, self.tokens = list(state_dict["step_times"]), state_dict["tokens"]

    def on_fit_start(self, trainer, pl_module):
        reset_peak_memory(pl_module.device)  # this run's peak, not the jobs' before it in this process

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step_s = time.perf_counter() - self.start
        model = pl_module.model
        tokens = kind_of(model).positions(model, batch[0]) * trainer.world_size
        self.step_times.append(step_s)
        if len(self.step_times) > 1:
            self.tokens += tokens
        pl_module.log_dict({"perf/step_s": step_s, "perf/tokens_per_s": tokens / step_s})

    def on_fit_end(self, trainer, pl_module):
        timed = self.step_times[1:] or self.step_times
        if not timed:
            return
        self.metrics = {"perf/step_s": sum(timed) / len(timed),
                        "perf/tokens_per_s": self.tokens / sum(timed) if self.tokens else 0.0,
                        "perf/peak_mem_mb": peak_memory_mb(pl_module.device)}
        log_to_loggers(trainer, {"perf/peak_mem_mb": self.metrics["perf/peak_mem_mb"]})


class MergeCheck(pl.Callback):
    """lora/merge_max_abs_diff: merged versus unmerged logits on a fixed validation batch,
    at the end of training. lora/merge_ok says whether it is within ``tolerance`` times the
    largest logit (at least 1): float32 rounding grows with the logits' scale, a wrong
    merge does not hide in it. It merges a copy: merge-then-unmerge is not exact in
    floating point, the final validation must see the weights training left, and a
    quantized (QLoRA) base is merged by dequantizing it for good."""

    def __init__(self, tolerance: float):
        self.tolerance = tolerance
        self.metrics: dict = {}

    @torch.no_grad()
    def on_fit_end(self, trainer, pl_module):
        model = pl_module.model
        if not lora_layers(model):
            return
        x, _ = next(iter(trainer.datamodule.val_dataloader()))
        x = x.to(pl_module.device)
        merged_model = copy.deepcopy(model).eval()
        merge_lora(merged_model, dequantize=True)
        merged = merged_model(x)[0].float()
        del merged_model
        was_training = model.training
        unmerged = model.eval()(x)[0].float()
        model.train(was_training)
        diff = (merged - unmerged).abs().max().item()
        ok = diff <= self.tolerance * max(1.0, unmerged.abs().max().item())
        self.metrics = {"lora/merge_max_abs_diff": diff, "lora/merge_ok": ok}
        log_to_loggers(trainer, {"lora/merge_max_abs_diff": diff, "lora/merge_ok": float(ok)})


class StepProgressBar(TQDMProgressBar):
    """Progress in optimizer steps, ``finetune step 120/150``: runs are bounded by
    ``max_steps``, so Lightning's per-epoch bar (``Epoch 1/-2``) would count nothing useful."""

    def __init__(self, description: str):
        super().__init__()
        self.description = description

    def on_train_epoch_start(self, trainer, *_):
        if trainer.current_epoch == 0 or self.train_progress_bar.total != trainer.max_steps:
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.initial = trainer.global_step
            self.train_progress_bar.set_description(f"{self.description} step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._should_update(trainer.global_step, trainer.max_steps):
            _update_n(self.train_progress_bar, trainer.global_step)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    @property
    def validation_description(self) -> str:
        """What a validation bar measures, instead of Lightning's ``Validation DataLoader 0``: the
        checks during training see ``limit_val_batches``; before and after, the whole split."""
        if self.trainer.state.fn != "validate":
            return f"{self.description} val"
        when = "before training" if self.trainer.global_step == 0 else "after training"
        return f"{self.description} eval {when} (whole val split)"

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.has_dataloader_changed(dataloader_idx):  # Lightning's, without " DataLoader 0"
            self.val_progress_bar.reset(total=convert_inf(self.total_val_batches_current_dataloader))
            self.val_progress_bar.set_description(self.validation_description)


class History(pl.Callback):
    """The loss curves, [step, value] pairs, for summary.json and the sweep report.
    Kept in checkpoints, so a resumed run's curves are the uninterrupted run's."""

    def __init__(self):
        self.history: dict[str, list] = {"train/loss": [], "val/loss": []}

    def state_dict(self) -> dict:
        return copy.deepcopy(self.history)

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = copy.deepcopy(state_dict)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs:  # empty when the step was skipped (a non-finite loss)
            self.history["train/loss"].append([trainer.global_step, outputs["loss"].item()])

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        curve = self.history["val/loss"]
        if curve and curve[-1][0] == trainer.global_step:  # validated again at the same step
            curve.pop()
        curve.append([trainer.global_step, trainer.callback_metrics["val/loss"].item()])


class AdapterAnalysis(pl.Callback):
    """analysis/*: the LoRA paper's §7 diagnostics of the trained adapters (``loralab.analysis``)
    at the end of training. ``layers`` holds one row per adapted layer (a W&B table,
    ``analysis/layers``), ``metrics`` their means (analysis/eff_rank_mean, ...)."""

    def __init__(self):
        self.metrics: dict = {}
        self.layers: list[dict] = []

    def on_fit_end(self, trainer, pl_module):
        # imported here, where used, like the loggers' optional parts
        from pytorch_lightning.loggers import WandbLogger

        from loralab.analysis import analyze_model, layer_means

        if not lora_layers(pl_module.model) or not all_finite(pl_module):
            return  # a diverged run's adapters hold NaN or inf: they have no spectrum (its status says why)
        self.layers = analyze_model(pl_module.model)
        self.metrics = layer_means(self.layers)
        log_to_loggers(trainer, self.metrics)
        columns = [name for name, value in self.layers[0].items() if not isinstance(value, list)]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("analysis/layers", columns=columns,
                                 data=[[row[name] for name in columns] for row in self.layers])


def all_finite(module: torch.nn.Module) -> bool:
    """Whether every trainable weight is a number (a diverged run's are NaN or inf)."""
    return all(torch.isfinite(p).all() for p in module.parameters() if p.requires_grad)
