"""The sweep report: one row per run and three plots, written into the sweep directory.

    python -m loralab.report outputs/multirun/2024-05-01/12-00-00     (or: loralab-report DIR)

It reads only what the jobs left on disk (``<sweep_dir>/<job>/summary.json``), so it
works for sweeps from any Hydra launcher, with failed or killed jobs, and offline.
Every job of a multirun rewrites it when it ends (see ``loralab.run.train``), so the
last job to end leaves the complete report. Columns use the metric names of
``summary.json`` and W&B, so the same table can be built in the dashboard.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from filelock import FileLock

# Markdown format of each metric column; the CSV holds the values exactly as summary.json does.
METRICS = {
    "params/trainable": "{:,}",
    "params/trainable_pct": "{:.2f}",
    "base/val_loss": "{:.4f}",
    "val/loss": "{:.4f}",
    "best/val_loss": "{:.4f}",
    "val/ppl": "{:.2f}",
    "gain/val_loss": "{:+.4f}",
    "lora/merge_max_abs_diff": "{:.1e}",
    "perf/tokens_per_s": "{:,.0f}",
}
COLUMNS = ["job", "overrides", "status", *METRICS, "wall_time_s", "error"]
RANK_KEY = "lora.rank"
HYDRA_OVERRIDES = ".hydra/overrides.yaml"  # Hydra writes it into the job directory before the job starts
NO_SUMMARY = "no summary.json: still running, or killed before it could write one (see the job's log)"
ERROR_CHARS = 120  # of an error in the Markdown table; the CSV keeps all of it
LOCK_TIMEOUT_S = 300  # jobs of a parallel launcher take turns; a report takes seconds


class ReportError(ValueError):
    pass


@dataclass
class Run:
    job: str  # the job's directory name: Hydra's job number
    status: str  # completed | failed | diverged | unfinished
    error: str | None
    overrides: list[str]  # the job's Hydra task overrides
    metrics: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)
    lora: dict = field(default_factory=dict)  # the run's lora config; {"enabled": False} for full fine-tuning
    wall_time_s: float | None = None
    swept: dict[str, str] = field(default_factory=dict)  # key -> its override, for the keys the sweep varies

    @property
    def label(self) -> str:
        return ",".join(self.swept.values()) or f"job {self.job}"

    @property
    def is_full(self) -> bool:
        return self.lora.get("enabled") is False

    @property
    def rank(self) -> int | None:
        rank = self.lora.get("rank")
        return rank if self.lora.get("enabled") and isinstance(rank, int) else None

    @property
    def has_result(self) -> bool:
        return self.status == "completed" and math.isfinite(self.metrics.get("val/loss", math.nan))


def write_report(sweep_dir: str | Path) -> Path:
    """Write report.md, report.csv and the plots into ``sweep_dir``; print the table."""
    sweep_dir = Path(sweep_dir)
    check_sweep_dir(sweep_dir)
    # Jobs of a parallel launcher end at the same time: one writer at a time, and each
    # reads the summaries only once it holds the lock, so the last writer sees them all.
    with FileLock(sweep_dir / ".report.lock", timeout=LOCK_TIMEOUT_S):
        runs = load_runs(sweep_dir)
        rows = [table_row(run) for run in runs]
        write_atomic(sweep_dir / "report.csv", to_csv(rows).encode())
        skipped = write_plots(runs, sweep_dir)
        table = to_markdown(rows)
        write_atomic(sweep_dir / "report.md", report_markdown(sweep_dir, runs, table, skipped).encode())
    print(f"\nSweep report ({sweep_dir / 'report.md'}):\n\n{table}", flush=True)
    return sweep_dir / "report.md"


def check_sweep_dir(sweep_dir: Path) -> None:
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir} is not a directory")
    if not any(sweep_dir.glob("*/summary.json")):
        raise ReportError(f"{sweep_dir} holds no run with a summary.json (expected {sweep_dir}/<job>/summary.json, "
                          "as a `python train.py -m ...` sweep directory does)")


def load_runs(sweep_dir: Path) -> list[Run]:
    """Every job directory, in job order; a job that left no summary.json is still a row."""
    job_dirs = [d for d in sweep_dir.iterdir() if (d / "summary.json").is_file() or (d / HYDRA_OVERRIDES).is_file()]
    runs = [load_run(d) for d in sorted(job_dirs, key=job_order)]
    swept = varying_keys([run.overrides for run in runs])
    for run in runs:
        run.swept = {key: override for key, _, override in parse_overrides(run.overrides) if key in swept}
    return runs


def job_order(job_dir: Path) -> tuple:
    return (0, int(job_dir.name), "") if job_dir.name.isdigit() else (1, 0, job_dir.name)


def load_run(job_dir: Path) -> Run:
    path = job_dir / "summary.json"
    if not path.is_file():
        overrides = yaml.safe_load((job_dir / HYDRA_OVERRIDES).read_text()) or []
        return Run(job=job_dir.name, status="unfinished", error=NO_SUMMARY, overrides=overrides)
    summary = json.loads(path.read_text())
    return Run(job=job_dir.name, status=summary["status"], error=summary.get("error"),
               overrides=summary.get("overrides", []), metrics=summary.get("metrics", {}),
               history=summary.get("history", {}), lora=summary.get("config", {}).get("lora", {}),
               wall_time_s=summary.get("wall_time_s"))


def varying_keys(overrides_per_run: list[list[str]]) -> list[str]:
    """The override keys whose values differ between runs (in command-line order): what
    tells the runs of a sweep apart. Keys the whole sweep shares are left out."""
    values = [{key: value for key, value, _ in parse_overrides(overrides)} for overrides in overrides_per_run]
    keys = dict.fromkeys(key for run in values for key in run)
    return [key for key in keys if len({run.get(key) for run in values}) > 1]


def parse_overrides(overrides: list[str]) -> list[tuple[str, str, str]]:
    """(key, value, override) as Hydra reads them: ``+lora.rank=4`` sets ``lora.rank``, and
    a run's ``x=false`` is a multirun's ``x=False`` (its sweeper rewrites the overrides)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # here: importing it takes 0.2 s

    return [(o.key_or_group, str(o.value()), o.input_line) for o in OverridesParser.create().parse_overrides(overrides)]


def table_row(run: Run) -> dict:
    return {"job": run.job, "overrides": ",".join(run.swept.values()), "status": run.status,
            **{name: run.metrics.get(name) for name in METRICS},
            "wall_time_s": run.wall_time_s, "error": run.error}


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(markdown_cell(name, row[name]) for name in COLUMNS) + " |")
    return "\n".join(lines)


def markdown_cell(column: str, value) -> str:
    if value is None:
        return ""
    if column in METRICS:
        text = METRICS[column].format(value)
    elif column == "wall_time_s":
        text = f"{value:.1f}"
    elif column == "error":
        text = shorten(value)
    else:
        text = str(value)
    return text.replace("|", r"\|")


def shorten(error: str) -> str:
    first_line = error.strip().splitlines()[0] if error.strip() else ""
    return first_line if len(first_line) <= ERROR_CHARS else first_line[: ERROR_CHARS - 1] + "…"


def report_markdown(sweep_dir: Path, runs: list[Run], table: str, skipped: dict[str, str]) -> str:
    tally = ", ".join(f"{n} {status}" for status, n in Counter(run.status for run in runs).items())
    plots = [f"No `{name}`: {skipped[name]}." if name in skipped else f"![{name}]({name})" for name, _, _ in PLOTS]
    parts = [f"# Sweep report: {sweep_dir}", f"{len(runs)} runs: {tally}.", table, "## Plots", *plots]
    return "\n\n".join(parts) + "\n"


def write_atomic(path: Path, content: bytes) -> None:
    """Readers never see half a file; the temporary name is the writer's own."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


# --- plots: what a researcher asks of a sweep, one figure each ---------------------


def write_plots(runs: list[Run], sweep_dir: Path) -> dict[str, str]:
    """Draw each plot that has data; return {file name: why not} for those that have none."""
    skipped = {}
    for name, draw, why_not in PLOTS:
        figure = draw(runs)
        if figure is None:
            skipped[name] = why_not
            (sweep_dir / name).unlink(missing_ok=True)  # a plot from an earlier report would be stale
            continue
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=120)
        write_atomic(sweep_dir / name, png.getvalue())
    return skipped


def new_axes(title: str, xlabel: str, ylabel: str, ncols: int = 1):
    # A bare Figure renders with Agg and never touches pyplot's global state or a GUI.
    # Imported here so that `import loralab.report` (every job imports it) stays fast.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6 * ncols, 4.5), layout="constrained")
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    figure.suptitle(title)
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    return figure, axes


def plot_loss_curves(runs: list[Run]):
    curves = [run for run in runs if run.has_result and run.history.get("train/loss")]
    if not curves:
        return None
    figure, (train_ax, val_ax) = new_axes("Loss curves", "step", "loss", ncols=2)
    train_ax.set_title("train/loss")
    val_ax.set_title("val/loss (step 0: the base model)")
    for run in curves:
        [line] = train_ax.plot(*zip(*run.history["train/loss"]), linewidth=1, alpha=0.8)
        val_ax.plot(*zip(*run.history["val/loss"]), marker="o", color=line.get_color(), label=run.label)
    val_ax.legend(fontsize="small")
    return figure


def series(run: Run) -> str:
    """The run's swept overrides other than the rank: one line per value in the rank plot."""
    return ",".join(override for key, override in run.swept.items() if key != RANK_KEY) or "LoRA"


def plot_val_loss_vs_rank(runs: list[Run]):
    lora_runs = [run for run in runs if run.has_result and run.rank is not None]
    ranks = sorted({run.rank for run in lora_runs})
    if len(ranks) < 2:
        return None
    figure, [ax] = new_axes("Final val/loss against LoRA rank", "lora.rank", "val/loss")
    for name in dict.fromkeys(series(run) for run in lora_runs):
        points = sorted((run.rank, run.metrics["val/loss"]) for run in lora_runs if series(run) == name)
        ax.plot(*zip(*points), marker="o", label=name)
    for run in runs:
        if run.has_result and run.is_full:
            ax.axhline(run.metrics["val/loss"], color="black", linestyle="--", label=f"full fine-tuning ({run.label})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(rank) for rank in ranks])
    ax.minorticks_off()
    ax.legend(fontsize="small")
    return figure


def plot_val_loss_vs_params(runs: list[Run]):
    finished = [run for run in runs if run.has_result]
    if not finished:
        return None
    figure, [ax] = new_axes("Final val/loss against trainable parameters", "params/trainable", "val/loss")
    lora_runs = [run for run in finished if not run.is_full]
    for name in dict.fromkeys(series(run) for run in lora_runs):
        points = [(run.metrics["params/trainable"], run.metrics["val/loss"])
                  for run in lora_runs if series(run) == name]
        ax.scatter(*zip(*points), label=name)
    for run in finished:
        if run.is_full:
            ax.scatter(run.metrics["params/trainable"], run.metrics["val/loss"], marker="*", s=200, color="black",
                       label=f"full fine-tuning ({run.label})")
    ax.step(*zip(*frontier(finished)), where="post", color="gray", linestyle=":", label="frontier")
    ax.set_xscale("log")
    ax.legend(fontsize="small")
    return figure


def frontier(runs: list[Run]) -> list[tuple[int, float]]:
    """(params, val/loss) of the runs no cheaper run beats: the efficiency frontier."""
    best = []
    for params, loss in sorted((run.metrics["params/trainable"], run.metrics["val/loss"]) for run in runs):
        if not best or loss < best[-1][1]:
            best.append((params, loss))
    return best


PLOTS = (  # (file name, drawing, why it may have nothing to draw)
    ("loss_curves.png", plot_loss_curves, "no run completed"),
    ("val_loss_vs_rank.png", plot_val_loss_vs_rank, "fewer than two LoRA ranks completed"),
    ("val_loss_vs_params.png", plot_val_loss_vs_params, "no run completed"),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="loralab-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory, e.g. outputs/multirun/<date>/<time>")
    args = parser.parse_args(argv)
    try:
        write_report(args.sweep_dir)
    except ReportError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
