"""Time the default experiment against its speed targets, side by side, in one run.

    python -m loralab.benchmark            # from the repository root (where train.py is)

Runs, in a fresh temporary output directory (so the first run really pretrains):
``python train.py`` twice (first time, then with the base cached) and
``python train.py -m lora.rank=4,8,16``, with W&B offline, and prints each wall time
next to its target and the ratio. What LoRA and QLoRA save (step time, peak memory,
forward and generation speed, checkpoint bytes) is measured by ``python -m loralab.savings``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loralab.layout import job_dirs, read_summary

# (what, extra train.py arguments, target wall time in seconds)
CASES = [
    ("python train.py (first time: pretrains the base)", [], 180),
    ("python train.py (base cached)", [], 60),
    ("python train.py -m lora.rank=4,8,16 (base cached)", ["-m", "lora.rank=4,8,16"], 180),
]


def timed_run(train_py: Path, args: list[str], workdir: Path) -> float:
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    start = time.perf_counter()
    subprocess.run([sys.executable, str(train_py), *args, "trainer.enable_progress_bar=false"], cwd=workdir,
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def sweep_gains(workdir: Path) -> str:
    """val/loss gain over the base of each run of the rank sweep: the sweep must show a difference."""
    sweep_dirs = sorted((workdir / "outputs" / "multirun").glob("*/*"))
    runs = [read_summary(job_dir) for sweep_dir in sweep_dirs for job_dir in job_dirs(sweep_dir)]
    return ", ".join(f"{r['name']}: {r['metrics']['gain/val_loss']:+.4f}" for r in runs)


def main() -> None:
    train_py = Path.cwd() / "train.py"
    if not train_py.is_file():
        sys.exit("error: run python -m loralab.benchmark from the repository root "
                 "(no train.py in the current directory)")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(what, timed_run(train_py, args, Path(tmp)), target) for what, args, target in CASES]
        gains = sweep_gains(Path(tmp))
    width = max(len(what) for what, _, _ in rows)
    print(f"{'command':<{width}}  {'wall s':>7}  {'target s':>8}  {'ratio':>6}")
    for what, seconds, target in rows:
        print(f"{what:<{width}}  {seconds:7.1f}  {target:8d}  {seconds / target:6.2f}")
    print(f"rank sweep, val/loss gain over the base: {gains}")


if __name__ == "__main__":
    main()
