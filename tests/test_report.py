"""The sweep report: written at the end of a real multirun with a failed job, its numbers
are the runs' own, its plots are real images, and the CLI rebuilds it from disk."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, run_train

from loralab.report import varying_keys, write_report

PLOTS = ("loss_curves.png", "val_loss_vs_rank.png", "val_loss_vs_params.png")
RANK_TOO_LARGE = "rank=1000 is larger than min(in, out)=64"
# Jobs in other processes at the same time, each rewriting the report as it ends (the basic,
# sequential launcher where the joblib plugin is not installed).
LAUNCHER = (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
            if importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") else [])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, base_cache) -> tuple[Path, subprocess.CompletedProcess]:
    """``-m lora.rank=2,4,1000``: two LoRA runs and one that fails (rank > the tiny model's width)."""
    tmp = tmp_path_factory.mktemp("report")
    sweep_dir = tmp / "sweep"
    result = run_train(["-m", *LAUNCHER, "lora.rank=2,4,1000", *TINY, "logger=none", f"paths.cache_dir={base_cache}",
                        f"hydra.sweep.dir={sweep_dir}"], cwd=tmp, check=False)
    assert result.returncode != 0, "the sweep with a failed job fails as a whole"
    return sweep_dir, result


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_multirun_ends_with_one_row_per_job_holding_the_runs_own_numbers(sweep):
    sweep_dir, result = sweep
    rows = read_csv(sweep_dir / "report.csv")
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [
        ("0", "lora.rank=2", "completed"), ("1", "lora.rank=4", "completed"), ("2", "lora.rank=1000", "failed")]
    for row in rows[:2]:
        metrics = summary(sweep_dir / row["job"])["metrics"]
        for name in ("val/loss", "best/val_loss", "base/val_loss", "gain/val_loss", "val/ppl",
                     "params/trainable_pct", "lora/merge_max_abs_diff", "perf/tokens_per_s"):
            assert float(row[name]) == metrics[name], name
        assert int(row["params/trainable"]) == metrics["params/trainable"]
        assert row["error"] == ""
    failed = rows[2]
    assert RANK_TOO_LARGE in failed["error"] and failed["error"] == summary(sweep_dir / "2")["error"]
    assert failed["val/loss"] == failed["params/trainable"] == ""

    markdown = (sweep_dir / "report.md").read_text()
    assert "| 2 | lora.rank=1000 | failed |" in markdown and RANK_TOO_LARGE in markdown
    assert all(f"![{name}]({name})" in markdown for name in PLOTS)
    assert "| job | overrides | status |" in result.stdout  # printed at the end of the sweep


def test_plots_are_non_empty_images(sweep):
    from matplotlib.image import imread

    sweep_dir, _ = sweep
    for name in PLOTS:
        png = sweep_dir / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        pixels = imread(png)[..., :3]
        assert (pixels < 0.9).any(), f"{name} is blank"


def test_cli_rebuilds_the_same_report_from_disk(sweep):
    sweep_dir, _ = sweep
    before = (sweep_dir / "report.csv").read_text()
    result = subprocess.run([sys.executable, "-m", "loralab.report", str(sweep_dir)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (sweep_dir / "report.csv").read_text() == before
    assert "| 1 | lora.rank=4 | completed |" in result.stdout


@pytest.mark.parametrize("make", [lambda tmp: tmp / "no-such-sweep", lambda tmp: tmp], ids=["missing", "empty"])
def test_cli_names_a_path_that_is_not_a_sweep(tmp_path, make):
    path = make(tmp_path)
    result = subprocess.run([sys.executable, "-m", "loralab.report", str(path)], capture_output=True, text=True)
    assert result.returncode != 0
    assert str(path) in result.stderr and "Traceback" not in result.stderr


def test_full_finetuning_baseline_joins_the_sweep_as_a_reference(sweep, tmp_path, base_cache):
    sweep_dir, _ = sweep
    swept = shutil.copytree(sweep_dir, tmp_path / "sweep")
    run_train(["lora=full", *TINY, "logger=none", f"paths.cache_dir={base_cache}", f"hydra.run.dir={swept / '3'}"],
              cwd=tmp_path)
    write_report(swept)
    rows = read_csv(swept / "report.csv")
    assert [(r["job"], r["overrides"]) for r in rows] == [
        ("0", "lora.rank=2"), ("1", "lora.rank=4"), ("2", "lora.rank=1000"), ("3", "lora=full")]
    full = summary(swept / "3")["metrics"]
    assert float(rows[3]["val/loss"]) == full["val/loss"] and float(rows[3]["params/trainable_pct"]) == 100
    assert rows[3]["lora/merge_max_abs_diff"] == ""  # nothing to merge
    assert all((swept / name).stat().st_size > 5000 for name in PLOTS)


def fake_job(sweep_dir: Path, job: str, overrides: list[str], summary: dict | None) -> None:
    (sweep_dir / job / ".hydra").mkdir(parents=True)
    (sweep_dir / job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (sweep_dir / job / "summary.json").write_text(json.dumps({"overrides": overrides, **summary}))


def test_rows_follow_job_numbers_and_a_killed_job_is_a_row(tmp_path):
    failed = {"status": "failed", "error": "RuntimeError: out of memory\n(a second line)"}
    for job in ("10", "9"):
        fake_job(tmp_path, job, [f"seed={job}", "model=tiny"], failed)
    fake_job(tmp_path, "11", ["seed=11", "model=tiny"], None)  # killed before it wrote a summary
    write_report(tmp_path)
    rows = read_csv(tmp_path / "report.csv")
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [
        ("9", "seed=9", "failed"), ("10", "seed=10", "failed"), ("11", "seed=11", "unfinished")]
    assert "no summary.json" in rows[2]["error"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| RuntimeError: out of memory |" in markdown  # the error's first line
    assert "No `val_loss_vs_rank.png`" in markdown and not (tmp_path / "val_loss_vs_rank.png").exists()


def test_swept_keys_are_those_whose_values_differ_between_runs():
    runs = [["lora.rank=4", "lora.alpha=8", "model=tiny"],
            ["lora.rank=8", "lora.alpha=8", "model=tiny"],
            ["+lora.rank=16", "lora.alpha=8", "model=tiny", "seed=1"]]
    assert varying_keys(runs) == ["lora.rank", "seed"]  # a key only some runs set differs too
    assert varying_keys([["lora.rank=4"]]) == []
    assert varying_keys([["lora=default"], ["lora=full"]]) == ["lora"]
    # A single run keeps `false` as typed where a multirun's sweeper writes `False`.
    assert varying_keys([["lora.rank=4", "x.flag=false"], ["lora.rank=8", "x.flag=False"]]) == ["lora.rank"]
