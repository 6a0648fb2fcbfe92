"""The base model cache: pretrained once per settings, shared by concurrent jobs."""

import json
import multiprocessing as mp
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from loralab.base import BaseError, cache_key, cached_base, load_base, save_base
from loralab.model import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16)
BASE = OmegaConf.create({"checkpoint": None, "corpus": "python_stdlib", "steps": 10, "lr": 1e-3, "seed": 0})


def slow_pretrain_job(cache_dir, calls_dir, job):
    def pretrain(checkpoint_dir):
        (calls_dir / f"pretrained-by-{job}").touch()
        time.sleep(1.0)  # long enough for the other job to arrive while this one works
        torch.manual_seed(0)
        return GPT(CONFIG)

    model, _ = cached_base(CONFIG, BASE, "corpus-digest", cache_dir, pretrain)
    torch.save(model.state_dict(), calls_dir / f"weights-{job}.pt")


def run_in_threads(jobs) -> None:
    """The jobs at the same time in this process: each opens the lock file itself, as a
    process does, so they contend for the same file lock."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result(timeout=120)


def run_in_processes(jobs) -> None:
    """The jobs at the same time in fresh processes, as a sweep's launcher runs them."""
    processes = [mp.get_context("spawn").Process(target=job) for job in jobs]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0


@pytest.mark.parametrize("run_jobs", [run_in_threads, pytest.param(run_in_processes, marks=pytest.mark.slow)],
                         ids=["threads", "processes"])  # processes: seconds of imports each
def test_two_concurrent_jobs_pretrain_once_and_get_the_same_base(tmp_path, run_jobs):
    cache_dir, calls_dir = tmp_path / "cache", tmp_path / "calls"
    calls_dir.mkdir()
    run_jobs([partial(slow_pretrain_job, cache_dir, calls_dir, i) for i in (0, 1)])
    assert len(list(calls_dir.glob("pretrained-by-*"))) == 1
    a, b = (torch.load(calls_dir / f"weights-{i}.pt") for i in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list(cache_dir.glob("base-*.safetensors"))) == 1


def test_cache_key_changes_with_everything_that_determines_the_base():
    key = cache_key(CONFIG, BASE, "digest")
    assert key == cache_key(GPTConfig(**vars(CONFIG)), OmegaConf.create(dict(BASE)), "digest")
    assert key != cache_key(GPTConfig(**{**vars(CONFIG), "n_layer": 2}), BASE, "digest")
    assert key != cache_key(CONFIG, OmegaConf.merge(BASE, {"steps": 11}), "digest")
    assert key != cache_key(CONFIG, BASE, "another corpus")
    assert key == cache_key(CONFIG, OmegaConf.merge(BASE, {"checkpoint": "x"}), "digest")  # not a setting


def test_base_checkpoint_roundtrip_keeps_weights_config_and_tying(tmp_path):
    torch.manual_seed(0)
    model = GPT(CONFIG)
    save_base(model, tmp_path / "base.safetensors")
    loaded, _ = load_base(tmp_path / "base.safetensors")
    assert loaded.config == CONFIG
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(BaseError, match="not a loralab base checkpoint"):
        load_base(tmp_path / "other.safetensors")


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_base_and_adapter_files_get_the_users_umask(tmp_path, umask):
    """A group-shared cache needs group-readable files: safetensors alone writes 0600."""
    import os
    import stat

    from loralab.adapters import save_adapter
    from loralab.lora import LoRAConfig, inject_lora

    model = GPT(GPTConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2, n_embd=16))
    previous = os.umask(umask)
    try:
        save_base(model, tmp_path / "base.safetensors")
        config = LoRAConfig(rank=2)
        inject_lora(model, config)
        save_adapter(model, config, tmp_path / "adapter")
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask  # what open() gives a new file under this umask
    for path in (tmp_path / "base.safetensors", tmp_path / "adapter" / "adapter.safetensors",
                 tmp_path / "adapter" / "adapter_config.json"):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


@pytest.mark.slow
def test_the_bases_evaluations_are_computed_once_and_read_by_every_run(tmp_path):
    from loralab.layout import read_summary
    from loralab.run import train

    from conftest import TINY, compose

    cache = tmp_path / "cache"  # its own: the session's cached evaluations stay untouched
    first_args = [*TINY, "logger=none", "lora.dropout=0.1", f"paths.cache_dir={cache}"]  # dropout: the RNG matters
    train(compose([*first_args, f"paths.output_dir={tmp_path / 'first'}"]))
    first = read_summary(tmp_path / "first")["metrics"]
    [evals] = (cache / "base-evals").iterdir()
    files = {path.name.split("-")[0]: path for path in evals.iterdir()}
    assert sorted(files) == ["forget", "test", "val"]
    assert json.loads(files["val"].read_text())["val/loss"] == first["base/val_loss"]
    # a later run, of another rank and seed, reads them: planted numbers show up in its summary
    files["val"].write_text(json.dumps({"val/loss": 1.5, "val/ppl": 4.5, "val/acc": 0.25}))
    files["test"].write_text(json.dumps({"loss": 2.5}))
    train(compose([*TINY, "logger=none", "lora.rank=2", "seed=7", f"paths.cache_dir={cache}",
                   f"paths.output_dir={tmp_path / 'second'}"]))
    second = read_summary(tmp_path / "second")
    assert (second["metrics"]["base/val_loss"], second["metrics"]["base/test_loss"]) == (1.5, 2.5)
    assert second["metrics"]["base/forget_loss"] == first["base/forget_loss"]
    assert second["history"]["val/loss"][0] == [0, 1.5]
    # the same run again, reading what the first computed, trains exactly as it did
    train(compose([*first_args, f"paths.output_dir={tmp_path / 'again'}"]))
    again = read_summary(tmp_path / "again")
    assert again["history"]["train/loss"] == read_summary(tmp_path / "first")["history"]["train/loss"]
