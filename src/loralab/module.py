"""The LightningModule: trains a model's trainable parameters, next-token prediction for a
GPT, image classification for a ViT."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from loralab.model import GPT
from loralab.model_kinds import kind_of
from loralab.schedule import warmup_cosine
from loralab.variants import lora_plus_param_groups
from loralab.vit import ViT


class LitTransformer(pl.LightningModule):
    """Trains whatever in ``model`` (any of loralab's transformers, see ``model_kinds``) requires
    grad: the LoRA adapters, or every weight for full fine-tuning and pretraining. A non-finite
    training loss stops the run as diverged."""

    def __init__(self, model: GPT | ViT, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95),
                 warmup_steps: int = 0, min_lr_ratio: float = 0.1, max_steps: int = 1, lora_plus_ratio: float = 1.0):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.lora_plus_ratio = lora_plus_ratio
        self.schedule = warmup_cosine(warmup_steps, max_steps, min_lr_ratio)
        n_classes = kind_of(model).n_classes(model)
        # a NaN batch makes val/loss inf, never dropped ("disable" would also drop the weights)
        self.val_loss = MeanMetric(nan_strategy=math.inf)
        self.val_ppl = Perplexity(ignore_index=-1)
        self.val_acc = MulticlassAccuracy(num_classes=n_classes, average="micro", ignore_index=-1)
        self.held_out_loss = MeanMetric(nan_strategy=math.inf)  # a whole held-out split: test, or the base's domain
        self.diverged = False

    def training_step(self, batch, batch_idx):
        x, y = batch  # (B, T), (B, T)
        _, loss = self.model(x, y)
        if not torch.isfinite(loss):
            self.diverged = True
            self.trainer.should_stop = True
            return None  # skips the optimizer step
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits, loss = self.model(x, y)  # (B, T, vocab), or (B, n_classes) for a ViT
        if y.dim() == 1:  # one class per image: a sequence of one token to the metrics
            logits, y = logits[:, None], y[:, None]  # (B, 1, n_classes), (B, 1)
        self.val_loss.update(loss, weight=y.numel())
        self.val_ppl.update(logits, y)
        self.val_acc.update(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        self.log_dict({"val/loss": self.val_loss, "val/ppl": self.val_ppl, "val/acc": self.val_acc},
                      prog_bar=True)

    def test_step(self, batch, batch_idx):
        """The loss alone, on whichever held-out split ``trainer.test`` is given."""
        x, y = batch
        _, loss = self.model(x, y)
        self.held_out_loss.update(loss, weight=y.numel())
        self.log("held_out/loss", self.held_out_loss)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only what training changes: for LoRA the adapters, so checkpoints stay small
        (the frozen base is rebuilt from its cache or checkpoint on resume). Add the RNG
        states, which dropout draws from."""
        trainable = {f"model.{name}" for name, p in self.model.named_parameters(remove_duplicate=False)
                     if p.requires_grad}  # both names of a tied weight (lm_head = wte)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """The frozen weights come from the model as it was built (the same base)."""
        checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}
        set_rng_states(checkpoint["rng_states"])

    def configure_optimizers(self):
        if self.lora_plus_ratio == 1:
            params = [p for p in self.model.parameters() if p.requires_grad]
        else:  # LoRA+: B at lora_plus_ratio × A's lr
            params = lora_plus_param_groups(self.model, self.lr, self.lora_plus_ratio, self.weight_decay)
        optimizer = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def rng_states() -> dict:
    """The generators a training step draws from (dropout): torch's CPU one and the GPUs'.
    (The data order has its own generator, see ``loralab.data.ResumableLoader``.)"""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
