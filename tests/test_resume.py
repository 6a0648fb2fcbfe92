"""Checkpoints and resume: a killed run or sweep goes on as if never stopped, and no
finished result is ever overwritten."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from loralab.base import load_base
from loralab.data import ResumableLoader
from loralab.exits import EXIT_CONFIG, EXIT_INTERRUPTED
from loralab.files import write_json
from loralab.jobs import contiguous_batches
from loralab.lora import LoRAConfig, analytic_lora_parameters, inject_lora
from loralab.model import GPT, GPTConfig
from loralab.module import LitTransformer
from loralab.resume import SweepDirError, jobs_to_run

from conftest import (
    RESUMABLE,
    TIMINGS,
    TINY,
    kill_at_first_checkpoint,
    read_summary,
    run_train,
    start_train,
    wait_for,
)


class Windows(torch.utils.data.Dataset):
    def __len__(self):
        return 23

    def __getitem__(self, i):
        return torch.tensor([i])


def test_resumed_loader_continues_the_uninterrupted_order():
    """Reference: a plain seeded shuffling DataLoader, epoch after epoch (23 items, batches
    of 4, the last 3 dropped: 5 batches an epoch)."""
    reference = DataLoader(Windows(), batch_size=4, shuffle=True, drop_last=True,
                           generator=torch.Generator().manual_seed(7))
    epochs = [[b.flatten().tolist() for b in reference] for _ in range(3)]
    for epoch, taken in [(0, 0), (0, 3), (1, 2), (0, 5), (2, 4)]:
        loader = ResumableLoader(Windows(), batch_size=4, seed=7, progress=dict)
        loader.load_state_dict({"epoch": epoch, "batches": taken, "per_epoch": 5})
        if taken == 5:  # a checkpoint at the end of an epoch continues with the next one
            epoch, taken = epoch + 1, 0
        assert [b.flatten().tolist() for b in loader] == epochs[epoch][taken:]
        if epoch + 1 < 3:
            assert [b.flatten().tolist() for b in loader] == epochs[epoch + 1]


CONFIG = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16)


def test_a_lora_checkpoint_holds_only_the_adapters():
    model = GPT(CONFIG)
    inject_lora(model, LoRAConfig(rank=2))
    lit = LitTransformer(model, lr=1e-2)
    checkpoint = {"state_dict": lit.state_dict()}
    lit.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == {f"model.{n}" for n, _ in model.named_parameters() if "lora_" in n}
    assert sum(v.numel() for v in checkpoint["state_dict"].values()) == analytic_lora_parameters(model)


def test_a_full_finetuning_checkpoint_restores_the_tied_head():
    """lm_head shares wte's tensor: it must come back trained, and still shared."""
    torch.manual_seed(0)
    trained = LitTransformer(GPT(CONFIG), lr=1e-2)
    with torch.no_grad():
        trained.model.transformer.wte.weight.add_(1.0)
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    torch.manual_seed(0)
    fresh = LitTransformer(GPT(CONFIG), lr=1e-2)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert fresh.model.lm_head.weight is fresh.model.transformer.wte.weight
    assert torch.equal(fresh.model.lm_head.weight, trained.model.lm_head.weight)
    trained_weights = trained.model.state_dict()
    assert all(torch.equal(v, trained_weights[k]) for k, v in fresh.model.state_dict().items())


def test_contiguous_batches_keep_each_jobs_number():
    assert contiguous_batches([1, 2, 4, 5, 6], None) == [(1, [1, 2]), (4, [4, 5, 6])]
    assert contiguous_batches([0, 1, 2], 2) == [(0, [0, 1]), (2, [2])]


def fake_job(job_dir: Path, overrides: list[str], status: str | None) -> None:
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra/overrides.yaml").write_text(yaml.safe_dump(overrides))
    if status:
        write_json(job_dir / "summary.json", {"status": status, "overrides": overrides})


JOBS = [["lora.rank=2"], ["lora.rank=4"], ["lora.rank=8"], ["lora.rank=16"]]


def job_dirs(sweep: Path) -> list[Path]:
    return [sweep / str(i) for i in range(len(JOBS))]


def test_resume_skips_finished_jobs_and_runs_the_rest(tmp_path):
    fake_job(tmp_path / "0", ["lora.rank=2"], "completed")
    fake_job(tmp_path / "1", ["lora.rank=4", "resume=true"], "failed")  # an earlier resume that failed
    fake_job(tmp_path / "2", ["lora.rank=8"], None)  # killed: no summary
    # job 3 never started
    assert jobs_to_run(tmp_path, JOBS, job_dirs(tmp_path), resume=True) == [1, 2, 3]
    fake_job(tmp_path / "3", ["lora.rank=16"], "interrupted")  # by SIGTERM: resumable
    assert jobs_to_run(tmp_path, JOBS, job_dirs(tmp_path), resume=True) == [1, 2, 3]
    write_json(tmp_path / "3/summary.json", {"status": "diverged", "overrides": ["lora.rank=16"]})
    assert jobs_to_run(tmp_path, JOBS, job_dirs(tmp_path), resume=True) == [1, 2]
    assert jobs_to_run(tmp_path / "new", JOBS, job_dirs(tmp_path / "new"), resume=False) == [0, 1, 2, 3]


def test_a_used_sweep_dir_is_refused_without_resume(tmp_path):
    fake_job(tmp_path / "2", ["lora.rank=8"], None)
    with pytest.raises(SweepDirError, match=f"^{tmp_path} already holds the results of 1 job.*resume=true"):
        jobs_to_run(tmp_path, JOBS, job_dirs(tmp_path), resume=False)


def test_a_job_dir_is_never_reused_for_another_job(tmp_path):
    fake_job(tmp_path / "0", ["lora.rank=2"], "completed")
    jobs = [["lora.rank=4"], ["lora.rank=8"]]  # the rerun of the "missing" values
    with pytest.raises(SweepDirError) as e:
        jobs_to_run(tmp_path, jobs, job_dirs(tmp_path)[:2], resume=True)
    assert str(e.value) == (f"{tmp_path / '0'} holds a different job: it ran with ['lora.rank=2'], job 0 of this "
                            "sweep is ['lora.rank=4']; it is never reused for another job")
    fake_job(tmp_path / "7", ["lora.rank=32"], "completed")
    with pytest.raises(SweepDirError, match=r"7 holds a job this sweep does not declare \(\['lora.rank=32'\]\)"):
        jobs_to_run(tmp_path, JOBS, job_dirs(tmp_path), resume=True)


def interrupt_after_first_checkpoint(process: subprocess.Popen, checkpoint: Path, signum: int) -> int:
    """Send ``signum`` to train.py as soon as ``checkpoint`` appears, having deleted that periodic
    checkpoint (so a checkpoint there afterwards is the one the interruption saved); its exit code."""
    wait_for(checkpoint, process)
    checkpoint.unlink()
    process.send_signal(signum)
    return process.wait(timeout=120)


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every file's bytes; a symbolic link (W&B links its service's log) as where it points."""
    return {str(p.relative_to(directory)): (f"-> {os.readlink(p)}".encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_killed_run_resumed_equals_an_uninterrupted_one(tmp_path, base_cache):
    args = [*RESUMABLE, f"paths.cache_dir={base_cache}"]
    run_train([*args, "logger=none", f"hydra.run.dir={tmp_path / 'whole'}"], cwd=tmp_path)  # W&B changes no number
    killed = tmp_path / "killed"
    step = kill_at_first_checkpoint(start_train([*args, f"hydra.run.dir={killed}"], tmp_path),
                                    killed / "checkpoints/last.ckpt")
    assert step == 6 and not (killed / "summary.json").exists()
    run_train([*args, f"hydra.run.dir={killed}", "resume=true"], cwd=tmp_path)

    whole, resumed = read_summary(tmp_path / "whole"), read_summary(killed)
    assert resumed["status"] == "completed" and resumed["steps"] == whole["steps"] == 12
    assert {k: v for k, v in resumed["metrics"].items() if k not in TIMINGS} == \
           {k: v for k, v in whole["metrics"].items() if k not in TIMINGS}
    assert resumed["history"] == whole["history"]  # the val/loss at step 6 included
    adapter = "adapter/adapter.safetensors"
    assert (killed / adapter).read_bytes() == (tmp_path / "whole" / adapter).read_bytes()
    run_id = (killed / "checkpoints/wandb-run-id").read_text()
    assert sorted(p.name.rsplit("-", 1)[1] for p in (killed / "wandb").glob("offline-run-*")) == [run_id, run_id]


def csv_log(run_dir: Path) -> list[dict]:
    """The rows of the run's CSV log, in order, without the columns that time the run."""
    with (run_dir / "csv/finetune/metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMINGS and v != ""} for row in csv.DictReader(f)]


def tensorboard_log(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Each scalar's (step, value) points as TensorBoard shows them, the timings left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard/finetune"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"] if tag not in TIMINGS}


@pytest.mark.slow
@pytest.mark.parametrize("logger, read_log", [("csv", csv_log), ("tensorboard", tensorboard_log)])
def test_a_resumed_log_holds_what_an_uninterrupted_one_does(tmp_path, base_cache, logger, read_log):
    args = [*RESUMABLE, f"paths.cache_dir={base_cache}", f"logger={logger}"]
    run_train([*args, f"hydra.run.dir={tmp_path / 'whole'}"], cwd=tmp_path)
    killed = tmp_path / "killed"
    kill_at_first_checkpoint(start_train([*args, f"hydra.run.dir={killed}"], tmp_path),
                             killed / "checkpoints/last.ckpt")
    run_train([*args, f"hydra.run.dir={killed}", "resume=true"], cwd=tmp_path)
    assert read_log(killed) == read_log(tmp_path / "whole")


@pytest.mark.slow
def test_a_killed_sweep_is_refused_then_resumed_without_touching_finished_jobs(tmp_path, base_cache):
    sweep = tmp_path / "sweep"
    args = ["-m", "lora.rank=2,4,8", *TINY, "checkpoint.every_n_steps=4", f"paths.cache_dir={base_cache}",
            f"hydra.sweep.dir={sweep}"]
    kill_at_first_checkpoint(start_train(args, tmp_path), sweep / "1/checkpoints/last.ckpt")
    assert read_summary(sweep / "0")["status"] == "completed" and not (sweep / "1/summary.json").exists()
    before = tree_bytes(sweep)

    refused = run_train(args, cwd=tmp_path, check=False)
    assert refused.returncode == EXIT_CONFIG  # refused before any job ran
    assert f"{sweep} already holds the results of 2 job(s): rerun with resume=true" in refused.stderr
    assert tree_bytes(sweep) == before

    run_train([*args, "resume=true"], cwd=tmp_path)
    assert tree_bytes(sweep / "0") == {k[2:]: v for k, v in before.items() if k.startswith("0/")}
    assert [read_summary(sweep / str(i))["status"] for i in range(3)] == ["completed"] * 3
    assert [read_summary(sweep / str(i))["overrides"][0] for i in range(3)] == [f"lora.rank={r}" for r in (2, 4, 8)]
    assert "Resuming finetune from" in (sweep / "1/train.log").read_text()
    assert not (sweep / "3").exists()


# SIGTERM with validation every 30 steps; SIGINT with validation after every step, so that the
# step boundary where training stops always has a validation just behind it (which the resumed
# run must neither skip nor repeat); one validation batch, so that a signal never lands inside a
# validation, where no checkpoint is taken (the periodic one, which the test deletes, would stand)
INTERRUPTIONS = [(signal.SIGTERM, ["trainer.max_steps=60", "trainer.val_check_interval=30",
                                    "trainer.limit_val_batches=1"]),
                 (signal.SIGINT, ["trainer.max_steps=40", "trainer.val_check_interval=1",
                                  "trainer.limit_val_batches=1", "lora.dropout=0.1"])]


@pytest.mark.slow
@pytest.mark.parametrize("signum, settings", INTERRUPTIONS, ids=["SIGTERM", "SIGINT"])
def test_an_interrupted_run_is_checkpointed_and_resumed_as_if_never_stopped(tmp_path, base_cache, signum, settings):
    args = [*TINY, *settings, "checkpoint.every_n_steps=5", "logger=none", f"paths.cache_dir={base_cache}"]
    run_train([*args, f"hydra.run.dir={tmp_path / 'whole'}"], cwd=tmp_path)
    run_dir = tmp_path / "interrupted"
    checkpoint = run_dir / "checkpoints/last.ckpt"
    assert interrupt_after_first_checkpoint(start_train([*args, f"hydra.run.dir={run_dir}"], tmp_path),
                                            checkpoint, signum) == EXIT_INTERRUPTED
    interrupted = read_summary(run_dir)
    assert interrupted["status"] == "interrupted" and not (run_dir / "adapter").exists()
    assert interrupted["error"] == f"stopped by {signum.name}: resume=true continues it from its last checkpoint"
    whole = read_summary(tmp_path / "whole")
    assert 5 <= torch.load(checkpoint, weights_only=True)["global_step"] < whole["steps"]

    run_train([*args, f"hydra.run.dir={run_dir}", "resume=true"], cwd=tmp_path)
    resumed = read_summary(run_dir)
    assert resumed["status"] == "completed" and resumed["steps"] == whole["steps"]
    assert {k: v for k, v in resumed["metrics"].items() if k not in TIMINGS} == \
           {k: v for k, v in whole["metrics"].items() if k not in TIMINGS}
    assert resumed["history"] == whole["history"]


@pytest.mark.slow
def test_an_interrupted_sweep_stops_at_its_job_and_resumes_the_rest(tmp_path, base_cache):
    sweep = tmp_path / "sweep"
    # one validation batch: a signal never lands inside a validation, where no checkpoint is taken
    # (the periodic one, which this test deletes, would stand); 40 steps: it lands before the end
    args = ["-m", "lora.rank=2,4,8", *TINY, "trainer.max_steps=40", "trainer.val_check_interval=20",
            "trainer.limit_val_batches=1", "checkpoint.every_n_steps=4", "logger=none",
            f"paths.cache_dir={base_cache}", f"hydra.sweep.dir={sweep}"]
    assert interrupt_after_first_checkpoint(start_train(args, tmp_path), sweep / "1/checkpoints/last.ckpt",
                                            signal.SIGTERM) == EXIT_INTERRUPTED
    assert [read_summary(sweep / str(i))["status"] for i in range(2)] == ["completed", "interrupted"]
    assert (sweep / "1/checkpoints/last.ckpt").is_file() and not (sweep / "2").exists()
    rows = [line.split(" | ")[:3] for line in (sweep / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert ["| 1", "lora.rank=4", "interrupted"] in rows and ["| 2", "lora.rank=8", "not started"] in rows

    run_train([*args, "resume=true"], cwd=tmp_path)
    assert [read_summary(sweep / str(i))["status"] for i in range(3)] == ["completed"] * 3
    assert "Resuming finetune from" in (sweep / "1/train.log").read_text()


@pytest.mark.slow
def test_a_killed_pretraining_goes_on_to_the_same_base(tmp_path, base_cache):
    args = [*TINY, "logger=none", "trainer.max_steps=1", "checkpoint.every_n_steps=10"]
    # the session's cache holds the TINY base (and other tests' bases): a run with TINY finds or makes it
    run_train([*args, f"paths.cache_dir={base_cache}", f"hydra.run.dir={tmp_path / 'reference'}"], cwd=tmp_path)
    reference = Path(json.loads((tmp_path / "reference" / "summary.json").read_text())["base"]["path"])
    cache = tmp_path / "cache"
    process = start_train([*args, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'killed'}"], tmp_path)
    assert kill_at_first_checkpoint(process, cache / reference.with_suffix(".ckpt-dir").name / "last.ckpt") == 10
    assert not (cache / reference.name).exists()

    run_train([*args, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'next'}"], cwd=tmp_path)
    assert "Resuming pretrain from" in (tmp_path / "next/train.log").read_text()
    # 30 steps, as if never stopped: the same weights (safetensors orders a file's metadata at random,
    # so its bytes differ between two processes that save the same weights)
    assert load_base(cache / reference.name)[1] == load_base(reference)[1]
    assert not (cache / reference.with_suffix(".ckpt-dir").name).exists()


@pytest.mark.slow
def test_a_run_dir_is_continued_only_by_its_own_run_and_never_overwritten(tmp_path, base_cache):
    run_dir = tmp_path / "run"
    args = [*RESUMABLE, "logger=none", f"paths.cache_dir={base_cache}", f"hydra.run.dir={run_dir}"]
    kill_at_first_checkpoint(start_train(args, tmp_path), run_dir / "checkpoints/last.ckpt")
    before = tree_bytes(run_dir)

    changed = run_train([*args, "trainer.max_steps=4", "lora.alpha=3", "resume=true"], cwd=tmp_path, check=False)
    assert changed.returncode == EXIT_CONFIG
    assert changed.stderr.strip().endswith("these keys differ: lora.alpha, trainer.max_steps")
    assert tree_bytes(run_dir) == before  # not even Hydra's .hydra/ was rewritten

    run_train([*args, "resume=true"], cwd=tmp_path)
    finished = tree_bytes(run_dir)
    again = run_train([*args, "lora.rank=4"], cwd=tmp_path, check=False)
    assert again.returncode == EXIT_CONFIG and f"{run_dir} holds a completed run" in again.stderr
    invalid = run_train([*args, "lora.rank=0"], cwd=tmp_path, check=False)
    assert invalid.returncode == EXIT_CONFIG and tree_bytes(run_dir) == finished

    (run_dir / "summary.json").write_text("{not json")
    damaged = run_train([*args, "resume=true"], cwd=tmp_path, check=False)
    assert damaged.returncode == EXIT_CONFIG and "Traceback" not in damaged.stderr
    assert damaged.stderr.startswith(f"{run_dir / 'summary.json'}: JSONDecodeError")


def test_a_directory_has_one_writer_and_a_dead_writers_lock_never_blocks(tmp_path):
    from loralab.layout import RunDirError, hold_writer_lock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from loralab.layout import hold_writer_lock; "
                               f"hold_writer_lock({str(tmp_path)!r}); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunDirError, match="is being written by another process"):
            hold_writer_lock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    hold_writer_lock(tmp_path)  # its lock file is still there; the kernel released the lock with its process


@pytest.mark.slow
def test_a_second_sweep_into_a_sweep_dir_being_written_is_refused(tmp_path, base_cache):
    sweep = tmp_path / "sweep"
    args = ["-m", "lora.rank=2,4", *TINY, "trainer.max_steps=5000", "logger=none", f"paths.cache_dir={base_cache}",
            f"hydra.sweep.dir={sweep}", "resume=true"]
    first = start_train(args, tmp_path)
    try:
        deadline = time.time() + 300
        while not (sweep / "0" / "checkpoints").is_dir():  # job 0 is training
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        second = run_train(args, cwd=tmp_path, check=False)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == EXIT_CONFIG
    assert second.stderr.strip() == (f"{sweep.resolve()} is being written by another process: wait for it to end, "
                                     "or choose another directory")
