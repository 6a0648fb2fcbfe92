"""loralab's sweeper (hydra_plugins.loralab_sweeper): the baseline once per seed, every job checked first."""

import pytest

from loralab.exits import EXIT_CONFIG
from loralab.jobs import without_redundant_jobs

from conftest import TINY, run_train


def test_full_finetuning_runs_once_per_seed_in_a_rank_sweep():
    grid = [[lora, f"lora.rank={r}", f"seed={s}"] for lora in ("lora=default", "lora=full") for r in (4, 8)
            for s in (1, 2)]
    kept = without_redundant_jobs(grid)
    assert [job for job in kept if job[0] == "lora=default"] == grid[:4]  # every LoRA setting and seed
    assert [job for job in kept if job[0] == "lora=full"] == [["lora=full", "lora.rank=4", "seed=1"],
                                                             ["lora=full", "lora.rank=4", "seed=2"]]


def test_jobs_that_differ_in_other_keys_are_all_kept():
    grid = [["lora=full", "optim.lr=0.01"], ["lora=full", "optim.lr=0.02"], ["lora=default", "optim.lr=0.01"]]
    assert without_redundant_jobs(grid) == grid


@pytest.mark.slow
def test_a_bad_job_stops_the_sweep_before_any_job_runs(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train(["-m", "lora.rank=2,0", *TINY, "logger=none", f"paths.cache_dir={tmp_path / 'cache'}",
                        f"hydra.sweep.dir={sweep}"], cwd=tmp_path, check=False)
    assert result.returncode == EXIT_CONFIG
    assert "job [lora.rank=0]: lora: LoRA rank=0 is invalid: expected a positive integer" in result.stderr
    assert not (sweep / "0").exists() and not (tmp_path / "cache").exists()  # job 0 never started, nothing pretrained
