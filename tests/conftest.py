"""Shared fixtures: the real config, shrunk so a run takes seconds."""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loralab.adapters import load_adapter
from loralab.lora import LoRAConfig, lora_layers
from loralab.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]

# The real default config, made tiny: every test run goes through the same code.
TINY = [
    "model=tiny", "base.steps=30", "base.max_bytes=200000", "base.batch_size=8",
    "data.max_bytes=60000", "data.batch_size=8",
    "trainer.max_steps=12", "trainer.val_check_interval=6", "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
]
# checkpoints every 6 steps, where validation also runs (the case Lightning would skip on
# resume), and LoRA dropout, so that the RNG state matters
RESUMABLE = [*TINY, "checkpoint.every_n_steps=6", "lora.dropout=0.1"]
# metrics that measure the machine, not the run: they differ between any two runs
TIMINGS = ("perf/step_s", "perf/tokens_per_s", "perf/peak_mem_mb")


@pytest.fixture(autouse=True)
def offline_everything(monkeypatch):
    """No test touches the network: W&B offline, Hugging Face offline."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def base_cache(tmp_path_factory) -> Path:
    """One cache of pretrained bases for the whole session, as a user's outputs/cache."""
    return tmp_path_factory.mktemp("cache")


# Jobs in other processes at the same time, each rewriting the report as it ends (the basic,
# sequential launcher where the joblib plugin is not installed).
LAUNCHER = (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
            if importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") else [])


@pytest.fixture(scope="session")
def rank_sweep(tmp_path_factory, base_cache) -> tuple[Path, subprocess.CompletedProcess]:
    """A real multirun, shared by the report and evaluation tests: two ranks and the full
    fine-tuning baseline in the same sweep, two seeds each."""
    tmp = tmp_path_factory.mktemp("rank_sweep")
    sweep_dir = tmp / "sweep"
    result = run_train(["-m", *LAUNCHER, "lora=default,full", "lora.rank=2,4", "seed=1,2", *TINY, "logger=none",
                        f"paths.cache_dir={base_cache}", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp)
    return sweep_dir, result


def user_env() -> dict:
    """The environment of a user's shell: W&B offline, and not the W&B service this test
    process may have started (WANDB_SERVICE): a ``train.py`` sharing it would find its own
    killed run still registered there ("run ID is in use")."""
    env = {key: value for key, value in os.environ.items() if key != "WANDB_SERVICE"}
    return {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def run_train(args: list[str], cwd: Path, check: bool = True, quiet_wandb: bool = True) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in a fresh process, as a user runs it (with W&B's console output
    when ``quiet_wandb`` is False)."""
    env = {**user_env(), "HYDRA_FULL_ERROR": "0"}
    if not quiet_wandb:
        env.pop("WANDB_SILENT")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def read_summary(run_dir: Path) -> dict:
    from loralab.layout import read_summary

    summary = read_summary(run_dir)
    assert summary is not None, f"{run_dir} holds no summary"
    return summary


def tiny_hf_gpt2(seed: int = 0, **config):
    """A random ``transformers`` GPT2LMHeadModel of the given GPT2Config sizes, biases and
    LayerNorms moved off their init, so a swapped or dropped parameter shows in the logits."""
    import torch
    import transformers

    torch.manual_seed(seed)
    last = config["vocab_size"] - 1  # <|endoftext|> is GPT-2's last token
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config, bos_token_id=last, eos_token_id=last))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def compose(overrides: list[str]):
    """The real config from conf/, composed with ``overrides`` (no Hydra run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import loralab.schema  # noqa: F401  registers train_schema, as train.py does

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def start_train(args: list[str], cwd: Path) -> subprocess.Popen:
    """``python train.py ARGS`` in its own process group, as a scheduler starts a job."""
    env = user_env()
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_for(checkpoint: Path, process: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while not checkpoint.is_file():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)


def kill_at_first_checkpoint(process: subprocess.Popen, checkpoint: Path) -> int:
    """SIGKILL the job (its whole process group: train.py and W&B's service) as soon as
    ``checkpoint`` appears; the step the checkpoint holds."""
    wait_for(checkpoint, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return torch.load(checkpoint, weights_only=True)["global_step"]


# --- tiny models for the unit tests of the torch-only core ---------------------------

TINY_GPT = GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=32)


def tiny_gpt(seed=0, **overrides):
    """A random GPT of ``TINY_GPT``'s sizes (``overrides`` change them)."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY_GPT.__dict__, **overrides}))


def randomize_lora_B(model, seed=1):
    """Give every adapter a non-zero B, so LoRA actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def tokens(seed=0, batch=2, length=16):
    """Random token ids for ``tiny_gpt``."""
    return torch.randint(0, TINY_GPT.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, seed=0):
    """``model``'s logits on ``tokens(seed)``, without gradients."""
    with torch.no_grad():
        return model(tokens(seed))[0]


# "a" has scale 8/4 = 2, a power of two; "b" an rsLoRA scale 5/sqrt(2), and targets that overlap a's in part
ADAPTER_CONFIGS = {"a": LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "k_proj"]),
                   "b": LoRAConfig(rank=2, alpha=5, target_modules=["q_proj", "fc_in"], scaling="rslora")}
ADAPTER_SCALES = {"a": 8 / 4, "b": 5 / math.sqrt(2)}  # by hand


def load_both(saved):
    """A fresh ``tiny_gpt`` with every adapter of ``saved`` (name -> directory) loaded."""
    model = tiny_gpt().eval()
    for name, directory in saved.items():
        load_adapter(model, directory, name=name)
    return model
