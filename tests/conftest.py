"""Shared fixtures: the real config, shrunk so a run takes seconds."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The real default config, made tiny: every test run goes through the same code.
TINY = [
    "model=tiny", "base.steps=30", "base.max_bytes=200000", "base.batch_size=8",
    "data.max_bytes=60000", "data.batch_size=8",
    "trainer.max_steps=12", "trainer.val_check_interval=6", "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
]


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


def run_train(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in a fresh process, as a user runs it."""
    env = {**user_env(), "HYDRA_FULL_ERROR": "0"}
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


def kill_at_first_checkpoint(process: subprocess.Popen, checkpoint: Path) -> int:
    """SIGKILL the job (its whole process group: train.py and W&B's service) as soon as
    ``checkpoint`` appears; the step the checkpoint holds."""
    deadline = time.time() + 300
    while not checkpoint.is_file():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    import torch  # imported where used, as in tiny_hf_gpt2

    return torch.load(checkpoint, weights_only=True)["global_step"]
