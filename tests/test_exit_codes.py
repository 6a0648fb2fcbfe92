"""A run's and a sweep's exit codes tell their outcome (loralab.exits)."""

from __future__ import annotations

import pytest

from loralab.exits import EXIT_DIVERGED, EXIT_FAILED, EXIT_INTERRUPTED, sweep_exit_code

from conftest import TINY, run_train
from conftest import read_summary as summary


def test_a_sweep_exits_with_its_worst_outcome():
    assert sweep_exit_code(["completed", "completed"]) == 0
    assert sweep_exit_code(["completed", "diverged"]) == EXIT_DIVERGED
    assert sweep_exit_code(["diverged", "failed", "completed"]) == EXIT_FAILED
    assert sweep_exit_code(["diverged", "interrupted"]) == EXIT_INTERRUPTED == 4  # resumable, not a result
    assert sweep_exit_code(["interrupted", "failed"]) == EXIT_FAILED
    assert sweep_exit_code(["completed", None]) == EXIT_FAILED  # a summary that cannot be read


@pytest.mark.slow
def test_diverged_exits_3_and_a_sweep_with_a_diverged_job_too(tmp_path, base_cache):
    diverging = ["trainer.gradient_clip_val=null", "logger=none", f"paths.cache_dir={base_cache}"]
    single = run_train([*TINY, *diverging, "optim.lr=1e30", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                       check=False)
    assert single.returncode == EXIT_DIVERGED and summary(tmp_path / "run")["status"] == "diverged"

    sweep_dir = tmp_path / "sweep"
    sweep = run_train(["-m", *TINY, *diverging, "optim.lr=1e30,0.01", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path,
                      check=False)
    assert sweep.returncode == EXIT_DIVERGED
    assert [summary(sweep_dir / job)["status"] for job in ("0", "1")] == ["diverged", "completed"]
    assert f"[loralab] sweep {sweep_dir}: 1 diverged, 1 completed (exit 3)" in sweep.stdout
