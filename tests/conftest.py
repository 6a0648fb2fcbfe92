"""Shared fixtures: the real config, shrunk so a run takes seconds."""

from __future__ import annotations

import os
import subprocess
import sys
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


def run_train(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in a fresh process, as a user runs it."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def compose(overrides: list[str]):
    """The real config from conf/, composed with ``overrides`` (no Hydra run directory)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)
