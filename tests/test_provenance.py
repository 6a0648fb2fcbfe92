"""A default run's console holds no upstream noise, and its summary records where it came from."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, run_train
from conftest import read_summary as summary
from wandb_offline import offline_runs

NOISE = ("LeafSpec", "litlogger", "anonymous setting has no effect", "Seed set to", "GPU available: False",
         "TPU available", "`Trainer.fit` stopped", "Run history", "Warning", "warn(")


@pytest.mark.slow
def test_a_default_run_prints_no_noise_and_records_its_provenance(tmp_path, base_cache):
    run_dir = tmp_path / "run"
    result = run_train([*TINY, f"paths.cache_dir={base_cache}", f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                       check=False, quiet_wandb=False)  # W&B as a user sees it: the default logger, not silenced
    console = result.stdout + result.stderr
    assert result.returncode == 0, console
    assert [noise for noise in NOISE if noise in console] == [], console
    assert "[loralab] " in result.stdout and ": completed |" in result.stdout  # it still says what matters

    recorded = summary(run_dir)["provenance"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert recorded["git_commit"] == head.strip() and isinstance(recorded["git_dirty"], bool)
    import pytorch_lightning
    import wandb

    assert recorded["versions"]["torch"] == torch.__version__
    assert recorded["versions"]["pytorch-lightning"] == pytorch_lightning.__version__
    assert recorded["versions"]["wandb"] == wandb.__version__
    assert recorded["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert recorded["device"] == "cpu" and recorded["machine"]["hostname"]
    [finetune] = [r for r in offline_runs(run_dir) if r.job_type == "finetune"]
    assert finetune.config["provenance.git_commit"] == recorded["git_commit"]
    assert finetune.config["provenance.versions.torch"] == torch.__version__


def test_git_state_is_none_outside_a_checkout_and_sees_uncommitted_changes(tmp_path):
    from loralab.provenance import git_state

    assert git_state(tmp_path) == (None, None)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "__init__.py").write_text("")
    subprocess.run([*git, "add", "__init__.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_state(tmp_path) == (head, False)
    (tmp_path / "__init__.py").write_text("x = 1\n")
    assert git_state(tmp_path) == (head, True)
