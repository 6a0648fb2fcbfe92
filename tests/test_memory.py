"""perf/peak_mem_mb is each run's own peak, even when a multirun's jobs share one process."""

import pytest
import pytorch_lightning as pl
import torch

from loralab.callbacks import Throughput
from loralab.data import TextDataModule
from loralab.memory import can_reset_cpu_peak, peak_memory_mb
from loralab.model import GPT, GPTConfig
from loralab.module import LitTransformer


@pytest.mark.skipif(not can_reset_cpu_peak(), reason="resetting the CPU peak needs Linux's /proc/self/clear_refs")
def test_a_run_does_not_count_the_peak_of_the_work_before_it_in_its_process():
    earlier_job = torch.ones(64 * 2**20)  # 256 MiB, touched, then freed
    del earlier_job
    process_peak = peak_memory_mb(torch.device("cpu"))

    model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32))
    data = TextDataModule("pydoc_topics", block_size=32, batch_size=4, max_bytes=6_000)
    throughput = Throughput()
    trainer = pl.Trainer(max_steps=3, logger=False, callbacks=[throughput], enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                         limit_val_batches=0, accelerator="cpu")
    trainer.fit(LitTransformer(model, lr=1e-3, max_steps=3), data)
    assert throughput.metrics["perf/peak_mem_mb"] < process_peak - 200  # the 256 MiB are not this run's
