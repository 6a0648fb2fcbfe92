"""hydra/launcher=packed end to end: each packed job is the run it is alone, within float32
summation order; a re-run is bit-identical; a diverging job leaves the others alone; a killed
pack goes on from its checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loralab.exits import EXIT_DIVERGED
from loralab.pack_sweep import plan

from conftest import TINY, compose, kill_at_first_checkpoint, read_summary, run_train, start_train

PACKED = ["hydra/launcher=packed"]
# two ranks x two seeds; the rank-4 jobs with another lr and other targets (every Linear)
EXPERIMENTS = {
    "pack_a": "lora:\n  rank: 2\noptim:\n  lr: 0.01\n",
    "pack_b": "lora:\n  rank: 4\n  target_modules: all-linear\noptim:\n  lr: 0.003\n",
}
JOBS = 4
TIMINGS = ("perf/", "wall_time_s")  # what measures the machine, not the run
# measured: the largest |adapter packed - adapter alone| over these jobs is 0 (bitwise equal) at
# this size on this CPU; stacked matmuls may sum in another order elsewhere, so allow float32 noise
ADAPTER_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> Path:
    """A config search path with the two experiments the sweep switches between."""
    conf = tmp_path_factory.mktemp("conf")
    (conf / "experiment").mkdir()
    for name, body in EXPERIMENTS.items():
        (conf / "experiment" / f"{name}.yaml").write_text(f"# @package _global_\n{body}")
    return conf


def test_the_plan_packs_what_shares_a_base_and_names_why_the_rest_runs_alone():
    default = compose(["lora.rank=4"])
    jobs = [default, compose(["lora=full"]), compose(["lora.rank=8", "lora.target_modules=all-linear", "seed=2"]),
            compose(["variant=dora"]), compose(["variant=lora_plus"]), compose(["lora.rank=2", "model=tiny"]),
            compose(["lora.rank=16", "optim.lr=0.1", "trainer.gradient_clip_val=0.5"])]
    packs, alone = plan(jobs, pack_size=None)
    assert packs == [[0, 2, 6]]  # lr and clipping are each job's own
    assert alone == {1: "lora=full trains every weight", 3: "lora.dora=True is not packed",
                     4: "optim.lora_plus_ratio=16.0 is not packed",
                     5: "no other job shares its base, model, data and trainer settings"}
    assert plan(jobs, pack_size=2)[0] == [[0, 2]] and plan(jobs, pack_size=2)[1][6].startswith("no other job")


def sweep_args(experiments: Path, base_cache: Path, sweep_dir: Path, *extra: str) -> list[str]:
    return ["-m", "experiment=pack_a,pack_b", "seed=1,2", *TINY, "checkpoint.every_n_steps=4", "logger=csv",
            f"hydra.searchpath=[file://{experiments}]", f"paths.cache_dir={base_cache}",
            f"hydra.sweep.dir={sweep_dir}", *extra]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, experiments, base_cache) -> dict[str, Path]:
    """The same four jobs packed, and one after another (Hydra's basic launcher)."""
    tmp = tmp_path_factory.mktemp("packed_sweep")
    packed = run_train(sweep_args(experiments, base_cache, tmp / "packed", *PACKED), cwd=tmp)
    assert "[loralab] packed: jobs 0, 1, 2, 3\n" in packed.stdout
    run_train(sweep_args(experiments, base_cache, tmp / "alone"), cwd=tmp)
    return {"packed": tmp / "packed", "alone": tmp / "alone"}


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter.safetensors")


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith(TIMINGS)}


def logged(run_dir: Path) -> list[tuple[str, list[str]]]:
    """The CSV log's rows as (step, the metrics logged in it), timings left out. A packed job
    logs its training curves as its run starts, so the rows of one step come in another order."""
    with (run_dir / "csv/finetune/metrics.csv").open(newline="") as f:
        return [(row["step"], sorted(k for k, v in row.items() if v != "" and not k.startswith(TIMINGS)))
                for row in csv.DictReader(f)]


@pytest.mark.slow
def test_each_packed_job_is_the_run_it_is_alone(sweeps):
    for job in map(str, range(JOBS)):
        packed, alone = read_summary(sweeps["packed"] / job), read_summary(sweeps["alone"] / job)
        assert packed["status"] == alone["status"] == "completed", job
        assert packed.keys() == alone.keys() and packed["metrics"].keys() == alone["metrics"].keys(), job
        assert packed["overrides"] == alone["overrides"] and packed["setting_id"] == alone["setting_id"], job
        for name in ("val/loss", "best/val_loss", "test/loss", "forget/loss"):
            assert packed["metrics"][name] == pytest.approx(alone["metrics"][name], abs=1e-5), (job, name)
        assert [s for s, _ in packed["history"]["val/loss"]] == [s for s, _ in alone["history"]["val/loss"]]
        assert [s for s, _ in packed["history"]["train/loss"]] == [s for s, _ in alone["history"]["train/loss"]]
        a, b = adapter(sweeps["packed"] / job), adapter(sweeps["alone"] / job)
        assert a.keys() == b.keys(), job
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= ADAPTER_TOLERANCE, job
        assert sorted(logged(sweeps["packed"] / job)) == sorted(logged(sweeps["alone"] / job)), job  # same curves
        assert (sweeps["packed"] / job / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_the_sweep_report_cannot_tell_a_packed_sweep(sweeps):
    def rows(sweep: Path) -> list[dict]:
        with (sweep / "report.csv").open(newline="") as f:
            return list(csv.DictReader(f))

    packed, alone = rows(sweeps["packed"]), rows(sweeps["alone"])
    assert [r.keys() for r in packed] == [r.keys() for r in alone]
    for p, a in zip(packed, alone):
        assert (p["job"], p["overrides"], p["status"]) == (a["job"], a["overrides"], a["status"])
        assert float(p["val/loss"]) == pytest.approx(float(a["val/loss"]), abs=1e-5)


@pytest.mark.slow
def test_a_packed_sweep_rerun_is_bit_identical(sweeps, experiments, base_cache, tmp_path):
    run_train(sweep_args(experiments, base_cache, tmp_path / "again", *PACKED), cwd=tmp_path)
    for job in map(str, range(JOBS)):
        first, again = read_summary(sweeps["packed"] / job), read_summary(tmp_path / "again" / job)
        assert untimed(again["metrics"]) == untimed(first["metrics"]) and again["history"] == first["history"], job
        assert (tmp_path / "again" / job / "adapter/adapter.safetensors").read_bytes() == \
               (sweeps["packed"] / job / "adapter/adapter.safetensors").read_bytes(), job


@pytest.mark.slow
def test_a_killed_pack_goes_on_from_its_checkpoints(sweeps, experiments, base_cache, tmp_path):
    sweep = tmp_path / "killed"
    args = sweep_args(experiments, base_cache, sweep, *PACKED)
    # the pack writes its jobs' checkpoints in job order: the last one's means all hold step 4
    assert kill_at_first_checkpoint(start_train(args, tmp_path), sweep / f"{JOBS - 1}/checkpoints/last.ckpt") == 4
    assert not any((sweep / str(job) / "summary.json").exists() for job in range(JOBS))
    refused = run_train(args, cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "rerun with resume=true" in refused.stderr  # its jobs are in their dirs
    resumed = run_train([*args, "resume=true"], cwd=tmp_path)
    assert "goes on from" in resumed.stderr + resumed.stdout
    for job in map(str, range(JOBS)):
        summary, whole = read_summary(sweep / job), read_summary(sweeps["packed"] / job)
        assert summary["status"] == "completed" and summary["history"] == whole["history"], job
        assert untimed(summary["metrics"]) == untimed(whole["metrics"]), job
        assert (sweep / job / "adapter/adapter.safetensors").read_bytes() == \
               (sweeps["packed"] / job / "adapter/adapter.safetensors").read_bytes(), job


@pytest.mark.slow
def test_a_diverging_job_leaves_the_pack_and_the_others_complete(experiments, base_cache, tmp_path):
    def args(lrs: str, sweep: Path) -> list[str]:
        return ["-m", "experiment=pack_a", "seed=1", f"optim.lr={lrs}", "trainer.gradient_clip_val=null", *TINY,
                "logger=none", f"hydra.searchpath=[file://{experiments}]", f"paths.cache_dir={base_cache}",
                f"hydra.sweep.dir={sweep}"]

    sweep = tmp_path / "diverging"
    result = run_train([*args("0.01,1e30", sweep), *PACKED], cwd=tmp_path, check=False)
    assert result.returncode == EXIT_DIVERGED, result.stderr[-2000:]
    assert "[loralab] packed: jobs 0, 1\n" in result.stdout
    completed, diverged = read_summary(sweep / "0"), read_summary(sweep / "1")
    assert (completed["status"], diverged["status"]) == ("completed", "diverged")
    assert diverged["steps"] < 12 and not (sweep / "1" / "adapter").exists()
    run_train(args("0.01", tmp_path / "alone"), cwd=tmp_path)  # the completed job, alone
    alone = read_summary(tmp_path / "alone/0")
    assert completed["metrics"]["val/loss"] == pytest.approx(alone["metrics"]["val/loss"], abs=1e-5)


def test_the_step_benchmark_times_the_solo_steps_the_pack_and_the_base_alone():
    """``python -m loralab.benchmark --step``: the headroom packing has on this machine."""
    from loralab.benchmark import step_times

    times = step_times(jobs=2, batch=1, repeats=1)
    assert list(times) == ["2 solo steps at batch 1", "1 packed step of 2 jobs", "base alone at batch 2"]
    assert all(seconds > 0 for seconds in times.values())
