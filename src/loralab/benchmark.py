"""Time the default experiment against its speed targets, side by side, in one run.

    python -m loralab.benchmark            # from the repository root (or: loralab-benchmark)
    python -m loralab.benchmark --sweep    # one sweep sequentially and packed (hydra/launcher=packed)
    python -m loralab.benchmark --step     # one training step: 8 jobs one after another, packed, the base alone

Runs, in a fresh temporary output directory (so the first run really pretrains):
``python train.py`` twice (first time, then with the base cached) and
``python train.py -m lora.rank=4,8,16``, with W&B offline, and prints each wall time
next to its target and the ratio. With ``--sweep``: ``python train.py -m lora.rank=2,4,8,16
seed=1,2`` at the default size, one job after another and then packed, on a base cached
first (not timed), and prints both wall times, their ratio, each job's training share of
its wall time, and the largest |Δ val/loss| between a packed job and its solo run. With
``--step``: what packing can gain at most on this machine, in plain PyTorch (no Lightning):
eight default LoRA steps at batch 16 one after another, one packed step of the eight, and
the frozen base's forward and backward alone at batch 128 (the pack's floor). What
LoRA and QLoRA save (step time, peak memory, forward and generation speed, checkpoint bytes)
is measured by ``python -m loralab.savings``.
"""

from __future__ import annotations

import argparse
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


SWEEP = ["-m", "lora.rank=2,4,8,16", "seed=1,2"]
PACKED = ["hydra/launcher=packed"]


def training_share(sweep_dir: Path, packed: bool) -> tuple[float, float]:
    """The sweep's mean job wall time, and the mean share of it spent in training steps
    (perf/step_s × steps). A packed job's wall is its share of the pack's steps plus its own
    run after the pack (its ``wall_time_s``)."""
    runs = [read_summary(d) for d in job_dirs(sweep_dir)]
    training = [r["metrics"]["perf/step_s"] * r["steps"] for r in runs]
    walls = [r["wall_time_s"] + (t if packed else 0) for r, t in zip(runs, training)]
    return sum(walls) / len(walls), sum(t / w for t, w in zip(training, walls)) / len(runs)


def largest_val_loss_difference(one: Path, other: Path) -> float:
    """max over jobs of |val/loss in one sweep − val/loss of the same job in the other|."""
    return max(abs(read_summary(a)["metrics"]["val/loss"] - read_summary(b)["metrics"]["val/loss"])
               for a, b in zip(job_dirs(one), job_dirs(other)))


def sweep_benchmark(train_py: Path, workdir: Path) -> None:
    """The same sweep one job after another and packed; both on a base cached first."""
    timed_run(train_py, ["trainer.max_steps=1", "logger=none", f"hydra.run.dir={workdir / 'base'}"], workdir)
    sequential, packed = workdir / "sequential", workdir / "packed"
    walls = {"sequential": timed_run(train_py, [*SWEEP, f"hydra.sweep.dir={sequential}"], workdir),
             "packed": timed_run(train_py, [*SWEEP, *PACKED, f"hydra.sweep.dir={packed}"], workdir)}
    print(f"python train.py {' '.join(SWEEP)} (8 jobs, default size, base cached)")
    for name, sweep_dir in (("sequential", sequential), ("packed", packed)):
        job_wall, share = training_share(sweep_dir, packed=name == "packed")
        print(f"  {name:<10}  wall {walls[name]:7.1f} s  job wall {job_wall:6.1f} s  training share {share:6.1%}")
    print(f"  packed is {walls['sequential'] / walls['packed']:.2f}x faster; largest |Δ val/loss| packed vs solo: "
          f"{largest_val_loss_difference(packed, sequential):.2e}")


def step_times(jobs: int = 8, batch: int = 16, repeats: int = 5) -> dict[str, float]:
    """Seconds per training step of the default model with the default LoRA (r = 8 on q, v):
    ``jobs`` solo steps at ``batch`` one after another; one packed step of ``jobs`` jobs; and
    the frozen base's forward and backward alone at ``jobs × batch`` rows (no adapter)."""
    import torch
    import torch.nn.functional as F

    from loralab.lora import LoRAConfig, inject_lora
    from loralab.model import GPT, GPTConfig
    from loralab.packed import JobSpec, Pack

    config = GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128)  # conf/model/small.yaml
    torch.manual_seed(0)

    def data(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, config.vocab_size, (2, rows, config.block_size)).unbind(0)

    def loss_of(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, _ = model(x)  # (rows, T, vocab)
        return F.cross_entropy(logits.reshape(-1, config.vocab_size), y.reshape(-1))

    solo = GPT(config)
    inject_lora(solo, LoRAConfig())
    optimizer = torch.optim.AdamW([p for p in solo.parameters() if p.requires_grad], lr=1e-3)
    x, y = data(batch)

    def solo_steps():
        for _ in range(jobs):
            optimizer.zero_grad(set_to_none=True)
            loss_of(solo, x, y).backward()
            optimizer.step()

    pack = Pack(GPT(config), {f"job{k}": JobSpec(LoRAConfig(), seed=k, lr=1e-3, max_steps=100) for k in range(jobs)})
    batches = {name: data(batch) for name in pack.jobs}
    base = GPT(config).requires_grad_(False)
    base.transformer.wte.weight.requires_grad_(True)  # a gradient through every layer, as the adapters need
    big_x, big_y = data(jobs * batch)

    def base_alone():
        loss_of(base, big_x, big_y).backward()
        base.transformer.wte.weight.grad = None

    def seconds(step) -> float:
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        return (time.perf_counter() - start) / repeats

    return {f"{jobs} solo steps at batch {batch}": seconds(solo_steps),
            f"1 packed step of {jobs} jobs": seconds(lambda: pack.train_step(batches)),
            f"base alone at batch {jobs * batch}": seconds(base_alone)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="loralab-benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true",
                        help="time lora.rank=2,4,8,16 seed=1,2 sequentially and packed (hydra/launcher=packed)")
    parser.add_argument("--step", action="store_true",
                        help="time one training step: 8 LoRA jobs one after another, packed, and the base alone")
    args = parser.parse_args(argv)
    if args.step:
        times = step_times()
        solo = next(iter(times.values()))
        for what, seconds in times.items():
            print(f"{what:<28}  {seconds * 1e3:7.0f} ms  {solo / seconds:5.2f}x the solo steps' speed")
        return
    train_py = Path.cwd() / "train.py"
    if not train_py.is_file():
        sys.exit("error: run python -m loralab.benchmark from the repository root "
                 "(no train.py in the current directory)")
    if args.sweep:
        with tempfile.TemporaryDirectory() as tmp:
            sweep_benchmark(train_py, Path(tmp))
        return
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
