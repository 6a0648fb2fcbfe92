"""The merge check measures without changing what it measures."""

import pytorch_lightning as pl
import torch

from loralab.callbacks import MergeCheck
from loralab.data import TextDataModule
from loralab.lora import LoRAConfig, inject_lora
from loralab.model import GPT, GPTConfig
from loralab.module import LitTransformer


class Snapshot(pl.Callback):
    """The model's weights as training left them, taken just before the merge check runs."""

    def on_fit_end(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def test_merge_check_leaves_the_weights_bit_identical():
    """A real two-step LoRA fit on Python's reference docs, the merge check its last callback."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32))
    inject_lora(model, LoRAConfig(rank=4, alpha=8, target_modules="all-linear"))
    data = TextDataModule("pydoc_topics", block_size=32, batch_size=4, max_bytes=20_000)
    snapshot, check = Snapshot(), MergeCheck(tolerance=1e-4)
    trainer = pl.Trainer(max_steps=2, logger=False, callbacks=[snapshot, check], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1, accelerator="cpu")
    trainer.fit(LitTransformer(model, lr=1e-2, max_steps=2), data)

    assert check.metrics["lora/merge_ok"] and 0 <= check.metrics["lora/merge_max_abs_diff"] < 1e-4
    after = model.state_dict()
    assert after.keys() == snapshot.weights.keys()
    assert all(torch.equal(after[k], snapshot.weights[k]) for k in after)

