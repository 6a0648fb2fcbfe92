"""The progress bar counts optimizer steps against max_steps, across epochs."""

import pytorch_lightning as pl
import torch

from loralab.callbacks import StepProgressBar
from loralab.data import TextDataModule
from loralab.model import GPT, GPTConfig
from loralab.module import LitTransformer


def test_progress_is_shown_in_steps_of_max_steps_across_epochs(capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32))
    data = TextDataModule("pydoc_topics", block_size=32, batch_size=16, max_bytes=6_000)  # 10 batches an epoch
    epoch_batches = len(data.train_dataloader())
    bar = StepProgressBar("finetune")
    trainer = pl.Trainer(max_steps=epoch_batches + 3, logger=False, callbacks=[bar], enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         accelerator="cpu")
    trainer.fit(LitTransformer(model, lr=1e-3, max_steps=trainer.max_steps), data)
    assert trainer.current_epoch >= 1  # the run crossed an epoch boundary ...
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (trainer.max_steps, trainer.max_steps)
    out = capsys.readouterr().out  # Lightning writes its bars to stdout
    assert "finetune step: 100%" in out and f"{trainer.max_steps}/{trainer.max_steps}" in out  # ... one bar
    assert "Epoch" not in out and "/-" not in out
