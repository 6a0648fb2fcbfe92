"""The sweep report: one row per run and three plots, written into the sweep directory.

    python -m loralab.report outputs/multirun/2024-05-01/12-00-00     (or: loralab-report DIR)

It reads only what the jobs left on disk (``<sweep_dir>/<job>/summary.json``), so it
works for sweeps from any Hydra launcher, with failed or killed jobs, and offline.
Every job of a multirun rewrites it when it ends (``SweepReport``, a Hydra callback
that Hydra calls for failed jobs too), so the last job to end leaves the complete
report. Columns use the metric names of ``summary.json`` and W&B, so the same table
can be built in the dashboard.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import itertools
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock
from hydra.errors import HydraException
from hydra.experimental.callback import Callback

from loralab import stats, tuning
from loralab.files import write_atomic
from loralab.layout import (
    MULTIRUN_YAML,
    SUMMARY,
    RunDirError,
    declared_jobs,
    hydra_overrides,
    job_dirs,
    job_order,
    read_summary,
    seed_of,
    setting_label,
    swept_keys,
)
from loralab.overrides import parse_overrides, swept_overrides
from loralab.plots import PLOTS, SweepResults, write_plots
from loralab.seed_stats import SETTING_COLUMNS, Setting, aggregate, setting_row

log = logging.getLogger(__name__)

# Markdown format of each metric column; the CSV holds the values exactly as summary.json does.
METRICS = {
    "params/trainable": "{:,}",
    "params/trainable_pct": "{:.2f}",
    "base/val_loss": "{:.4f}",
    "val/loss": "{:.4f}",
    "best/val_loss": "{:.4f}",
    "val/ppl": "{:.2f}",
    "gain/val_loss": "{:+.4f}",
    "test/loss": "{:.4f}",
    "forget/increase": "{:+.4f}",
    "lora/merge_max_abs_diff": "{:.1e}",
    "perf/tokens_per_s": "{:,.0f}",
}
COLUMNS = ["job", "overrides", "status", *METRICS, "wall_time_s", "error"]
NO_SUMMARY = f"no {SUMMARY}: still running, or killed before it could write one (see the job's log)"
NOT_STARTED = "declared by the sweep (multirun.yaml), never started"
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
    seed: int | None = None
    swept: dict[str, str] = field(default_factory=dict)  # key -> its override, for the keys the sweep varies

    @property
    def label(self) -> str:
        return ",".join(self.swept.values()) or f"job {self.job}"

    @property
    def setting(self) -> str:
        """What the run varies apart from its seed: runs that differ only in seed are one setting."""
        return setting_label(self.swept) or "all runs"

    @property
    def is_full(self) -> bool:
        return self.lora.get("enabled") is False

    @property
    def rank(self) -> int | None:
        rank = self.lora.get("rank")
        return rank if self.lora.get("enabled") and isinstance(rank, int) else None

    @property
    def finished(self) -> bool:
        """The job has ended for good: not running, not yet started, not interrupted (resumable)."""
        return self.status not in ("unfinished", "not started", "interrupted")

    @property
    def has_result(self) -> bool:
        return self.status == "completed" and math.isfinite(self.metrics.get("val/loss", math.nan))


def write_report(sweep_dir: str | Path, tune: str | None = None, show: bool = True) -> Path:
    """Write report.md, report.csv, settings.csv and the plots into ``sweep_dir`` (and tuned.csv
    when ``tune`` names a key, or the sweep varies optim.lr); ``show``: print the settings table."""
    sweep_dir = Path(sweep_dir)
    check_sweep_dir(sweep_dir)
    # Jobs of a parallel launcher end at the same time: one writer at a time, and each
    # reads the summaries only once it holds the lock, so the last writer sees them all.
    with FileLock(sweep_dir / ".report.lock", timeout=LOCK_TIMEOUT_S):
        runs = load_runs(sweep_dir)
        tune = tune or (tuning.TUNE_KEY if any(tuning.TUNE_KEY in run.swept for run in runs) else None)
        settings, tuned = aggregate(runs), tuning.tune(runs, tune or tuning.TUNE_KEY)
        rows = [table_row(run) for run in runs]
        write_atomic(sweep_dir / "report.csv", to_csv(rows, COLUMNS).encode())
        write_atomic(sweep_dir / "settings.csv", to_csv([setting_row(s) for s in settings], SETTING_COLUMNS).encode())
        if tune:
            tuned_rows = [tuning.tuned_row(t) for t in tuned]
            own_keys = list(dict.fromkeys(key for t in tuned for key in t.keys))
            write_atomic(sweep_dir / "tuned.csv", to_csv(tuned_rows, tuning.TUNED_COLUMNS + own_keys).encode())
        skipped = write_plots(SweepResults(runs, settings, tuned, tune), sweep_dir)
        table, setting_table = to_markdown(rows), settings_markdown(settings)
        tuned_section = tuned_markdown(tuned, tune) if tune else []
        write_atomic(sweep_dir / "report.md", report_markdown(sweep_dir, runs, settings, setting_table, table,
                                                               skipped, tuned_section).encode())
    if show:
        print(f"\nSweep report ({sweep_dir / 'report.md'}):\n\n{setting_table}\n\n{verdicts(settings)}", flush=True)
        if tune:
            print("\n" + "\n\n".join(tuned_section[2:]), flush=True)
    return sweep_dir / "report.md"


def check_sweep_dir(sweep_dir: Path) -> None:
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir} is not a directory")
    if not job_dirs(sweep_dir) and not (sweep_dir / MULTIRUN_YAML).is_file():
        raise ReportError(f"{sweep_dir} holds no run with a {SUMMARY} (expected {sweep_dir}/<job>/{SUMMARY}, "
                          "as a `python train.py -m ...` sweep directory does)")


def load_runs(sweep_dir: Path) -> list[Run]:
    """Every job directory, in job order, and every job the sweep declared that has none; a job
    that left no summary.json, or one that cannot be read, is still a row."""
    runs = [read_run(d) for d in job_dirs(sweep_dir)]
    started = {tuple(sorted(run.overrides)) for run in runs}
    taken = {run.job for run in runs}
    for number, overrides in enumerate(declared_jobs(sweep_dir) or []):
        if tuple(sorted(overrides)) not in started and str(number) not in taken:
            runs.append(Run(job=str(number), status="not started", error=NOT_STARTED, overrides=overrides))
    runs.sort(key=lambda run: job_order(Path(run.job)))
    swept = swept_keys(sweep_dir, [run.overrides for run in runs])
    for run in runs:
        run.swept = swept_overrides(run.overrides, swept)
    return runs


def read_run(job_dir: Path) -> Run:
    """The job's row: from its summary.json; ``unfinished`` without one; ``unreadable`` (and why)
    when it is not JSON or lacks what a row needs."""
    try:
        summary = read_summary(job_dir)
        if summary is None:
            return Run(job=job_dir.name, status="unfinished", error=NO_SUMMARY, overrides=saved_overrides(job_dir))
        config = summary.get("config", {})
        metrics = {name: value for name, value in summary.get("metrics", {}).items()
                   if isinstance(value, (int, float))}  # what else a damaged file holds would stop the report
        history = {name: [(int(step), float(value)) for step, value in curve]
                   for name, curve in summary.get("history", {}).items()}
        wall_time_s, error = summary.get("wall_time_s"), summary.get("error")
        run = Run(job=job_dir.name, status=summary["status"], error=None if error is None else str(error),
                  overrides=list(summary.get("overrides", [])), metrics=metrics, history=history,
                  lora=dict(config.get("lora", {})), wall_time_s=None if wall_time_s is None else float(wall_time_s),
                  seed=seed_of(summary))
        parse_overrides(run.overrides)  # the row's label
        return run
    except RunDirError as e:
        return Run(job=job_dir.name, status="unreadable", error=f"unreadable: {e}", overrides=saved_overrides(job_dir))
    except (ValueError, TypeError, AttributeError, HydraException) as e:  # it lacks what a row needs
        error = f"unreadable: {job_dir / SUMMARY}: {type(e).__name__}: {e}"
        return Run(job=job_dir.name, status="unreadable", error=error, overrides=saved_overrides(job_dir))


def saved_overrides(job_dir: Path) -> list[str]:
    """The job's overrides as Hydra saved them before it started; [] when unreadable."""
    try:
        return hydra_overrides(job_dir) or []
    except RunDirError:  # damaged: the row has no label, the report goes on
        return []


def table_row(run: Run) -> dict:
    return {"job": run.job, "overrides": ",".join(run.swept.values()), "status": run.status,
            **{name: run.metrics.get(name) for name in METRICS},
            "wall_time_s": run.wall_time_s, "error": run.error}


def to_csv(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [markdown_row([markdown_cell(name, row[name]) for name in COLUMNS]) for row in rows]
    return "\n".join(lines)


def markdown_row(cells: list[str]) -> str:
    """One table row: a ``|`` inside a cell would end it."""
    return "| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |"


def plain(text) -> str:
    """Text read from a run's files (an override, a status, an error) as Markdown shows it: on
    one line, and no HTML (a ``<script>`` in a summary.json stays text)."""
    return html.escape(" ".join(str(text).split()), quote=False)


def markdown_cell(column: str, value) -> str:
    if value is None:
        return ""
    if column in METRICS:
        text = METRICS[column].format(value)
    elif column == "wall_time_s":
        text = f"{value:.1f}"
    elif column == "error":
        text = plain(shorten(value))
    else:
        text = plain(value)
    return text


def shorten(error: str) -> str:
    first_line = error.strip().splitlines()[0] if error.strip() else ""
    return first_line if len(first_line) <= ERROR_CHARS else first_line[: ERROR_CHARS - 1] + "…"


def report_markdown(sweep_dir: Path, runs: list[Run], settings: list[Setting], setting_table: str, table: str,
                    skipped: dict[str, str], tuned_section: list[str]) -> str:
    tally = ", ".join(f"{n} {plain(status)}" for status, n in Counter(run.status for run in runs).items())
    plots = [f"No `{name}`: {skipped[name]}." if name in skipped else f"![{name}]({name})" for name, _, _ in PLOTS]
    # with two settings the one pair is the comparison with the best
    pairs = ["## Every pair of settings", PAIRS_NOTE, every_pair(settings)] if len(comparable(settings)) > 2 else []
    parts = [f"# Sweep report: {sweep_dir}", f"{len(runs)} runs: {tally}.",
             "## Settings (mean over completed seeds, 95 % CI)", STATS_NOTE, setting_table,
             f"## Comparisons with the {best_label(settings)}", verdicts(settings),
             *pairs, *tuned_section,
             "## Runs", table, "## Plots", *plots, "## Inside the adapters", analysis_link(sweep_dir)]
    return "\n\n".join(parts) + "\n"


def analysis_link(sweep_dir: Path) -> str:
    """The LoRA paper's §7 analyses of this sweep's adapters, written by loralab.analyze."""
    command = f"`python -m loralab.analyze {sweep_dir}`"
    if (sweep_dir / "analysis.md").is_file():
        return f"[analysis.md](analysis.md): ΔW spectra, amplification, subspace similarity ({command} rebuilds it)."
    return f"{command} writes `analysis.md`: ΔW spectra, amplification, subspace similarity between ranks and seeds."


# --- settings: the runs of one setting over seeds, and whether settings differ -----

STATS_NOTE = ("Runs that differ only in `seed` are one setting. n counts completed seeds; failed, diverged "
              "and unfinished seeds are counted apart and left out of the statistics. ± is the half-width "
              "of the 95 % Student-t confidence interval of the mean; test/loss and forget/increase are "
              "blank where the runs did not measure them. Each setting is compared with the best on the "
              "final val/loss (paired t-test over shared seeds, else Welch's t-test): p is raw, Holm p is "
              "adjusted over all the comparisons with the best, and a setting is worse beyond noise only "
              "when Holm p < 0.05; otherwise the difference is not shown at these seeds, and the 95 % CI "
              "of the difference bounds how large it can be.")


def best_label(settings: list[Setting]) -> str:
    """"best setting", or "best so far (k of N finished)" while jobs of the sweep are still to run."""
    best = next((s for s in settings if s.best), None)
    return "best setting" if best is None or best.best == "best" else best.best
def mean_ci(est: stats.Estimate | None, fmt: str = "{:.4f}") -> str:
    if est is None:
        return ""
    if est.ci is None:
        return fmt.format(est.mean) + " (1 seed: no uncertainty estimate)"
    return f"{fmt.format(est.mean)} ± {est.half_width:.4f}"


def settings_markdown(settings: list[Setting]) -> str:
    header = ["setting", "n", "not completed", "val/loss", "std", "test/loss", "best/val_loss", "gain/val_loss",
              "forget/increase", "params/trainable", "p", "Holm p", "vs best"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in settings:
        est = s.estimates["val/loss"]
        params = setting_row(s)["params/trainable"]
        p_raw = s.vs_best.p_value if s.vs_best else None
        cells = [plain(s.name), str(len(s.completed)), str(len(s.runs) - len(s.completed)), mean_ci(est),
                 f"{est.std:.4f}" if est is not None and est.std is not None else "",
                 mean_ci(s.estimates["test/loss"]), mean_ci(s.estimates["best/val_loss"]),
                 mean_ci(s.estimates["gain/val_loss"], "{:+.4f}"), mean_ci(s.estimates["forget/increase"], "{:+.4f}"),
                 f"{params:,}" if params is not None else "", "" if p_raw is None else f"{p_raw:.3g}",
                 "" if s.p_holm is None else f"{s.p_holm:.3g}", s.verdict]
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def verdicts(settings: list[Setting]) -> str:
    """One sentence per setting against the best: the difference, its CI, the raw and Holm p-values;
    mid-sweep the best is the best so far, never "Best setting"."""
    best = next((s for s in settings if s.best), None)
    if best is None:
        return "No setting completed."
    n = len(best.completed)
    lines = [f"{best_label(settings).capitalize()}: **{plain(best.name)}** (final val/loss "
             f"{mean_ci(best.estimates['val/loss'])}, {n} seed{'s' if n != 1 else ''})."]
    for s in settings:
        c = s.vs_best
        if c is None:
            continue
        if c.ci is None:
            lines.append(f"- {plain(s.name)}: {c.diff:+.4f} against the best; no test (a setting has fewer than 2 "
                         "seeds).")
            continue
        lines.append(f"- {plain(s.name)}: {c.diff:+.4f} [{c.ci[0]:+.4f}, {c.ci[1]:+.4f}] against the best, "
                     f"p = {c.p_value:.3g} (Holm p = {s.p_holm:.3g}, {c.test}): {s.verdict}.")
    return "\n".join(lines)


PAIRS_NOTE = ("The question a sweep asks is often about two settings, neither of them the best (is r = 16 "
              "better than r = 8?). Each line is the first setting minus the second, with the 95 % CI of the "
              "difference and the same test as above, its raw p-value and beside it the Holm-adjusted one "
              "(over all the pairs: many tests at once would otherwise find about one false difference in "
              "twenty). A pair differs beyond noise only when the adjusted p < 0.05; otherwise the difference "
              "is not shown at these seeds, and the CI bounds how large it can be.")


def comparable(settings: list[Setting]) -> list[Setting]:
    return [s for s in settings if len(s.completed) >= 2]


def every_pair(settings: list[Setting]) -> str:
    """One line per pair of settings with at least 2 completed seeds, in job order, Holm-adjusted."""
    compared = [(a, b, stats.compare(a.by_seed(), b.by_seed()))
                for a, b in itertools.combinations(comparable(settings), 2)]
    adjusted = stats.holm([c.p_value for _, _, c in compared])
    return "\n".join(pair_line(a.name, b.name, c, p, "val/loss") for (a, b, c), p in zip(compared, adjusted))


def pair_line(a: str, b: str, c: stats.Comparison, p_adjusted: float, metric: str) -> str:
    """``a − b: diff [CI], p = raw (Holm p = adjusted, test): verdict`` — never "the same"."""
    a, b = plain(a), plain(b)
    lower = a if c.diff < 0 else b
    verdict = f"{lower} has the lower {metric}" if p_adjusted < stats.SIGNIFICANCE else stats.not_shown(c)
    return (f"- {a} − {b}: {c.diff:+.4f} [{c.ci[0]:+.4f}, {c.ci[1]:+.4f}], p = {c.p_value:.3g} "
            f"(Holm p = {p_adjusted:.3g}, {c.test}): {verdict}.")


TUNED_NOTE = ("Each setting (everything but `{key}` and the seed) at its own best `{key}`: the one with the "
              "lowest mean final val/loss over seeds (ties: the smaller; never one at which a seed diverged), "
              "then compared on test/loss, which the choice never saw (mean ± 95 % CI over the seeds at that "
              "lr). Also in `tuned.csv`. A choice at the edge of the grid is flagged: its best lr may lie "
              "outside the grid.")


def tuned_markdown(tuned: list[tuning.TunedSetting], key: str) -> list[str]:
    """The report's section on settings compared at their chosen lr: a table, its warnings, the pairs."""
    header = ["setting", f"chosen {key}", "grid", "n", "val/loss", "test/loss", "learning (test)",
              "forget/increase", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in tuned:
        p = t.chosen
        grid = ", ".join(f"{q.lr:g}" if q.lr is not None else "not swept" for q in t.points)
        learned = [r.metrics["base/test_loss"] - r.metrics["test/loss"] for r in p.completed
                   if {"base/test_loss", "test/loss"} <= r.metrics.keys()] if p else []
        chosen = "" if p is None or p.lr is None else f"{p.lr:g}"
        cells = [plain(t.name), chosen, grid, str(len(p.completed) if p else 0),
                 mean_ci(p.estimate("val/loss") if p else None), mean_ci(p.estimate("test/loss") if p else None),
                 mean_ci(stats.estimate(learned) if learned else None, "{:+.4f}"),
                 mean_ci(p.estimate("forget/increase") if p else None, "{:+.4f}"), plain(t.note)]
        lines.append(markdown_row(cells))
    pairs = tuning.pairs(tuned)
    pair_lines = [pair_line(q.a.name, q.b.name, q.comparison, q.p_adjusted, "test/loss") for q in pairs]
    return [f"## Settings at their own best {key}", TUNED_NOTE.format(key=key), "\n".join(lines),
            f"### Every pair at the chosen {key} (test/loss, Holm-adjusted)",
            "\n".join(pair_lines) or "No pair with at least 2 completed seeds each."]


class SweepReport(Callback):
    """The sweep report, rewritten whenever one of its jobs ends (conf/train.yaml's
    ``hydra.callbacks``), so it is complete with any launcher; printed, and logged to W&B,
    once the sweep has ended (``loralab.sweep_console``). Hydra skips ``on_multirun_end``
    once a job raised: loralab's sweeper then ends the sweep itself."""

    def on_job_start(self, config, **kwargs) -> None:
        from hydra.types import RunMode

        from loralab.sweep_console import announce_job

        if config.hydra.mode == RunMode.MULTIRUN:
            announce_job(config)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        try:
            write_report(config.hydra.sweep.dir, show=False)
        except Exception as e:  # a broken report must not mask the job's own result or error
            log.warning("sweep report not written in %s: %s", config.hydra.sweep.dir, e)

    def on_multirun_end(self, config, **kwargs) -> None:
        from loralab.sweep_console import end_sweep

        end_sweep(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="loralab-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory, e.g. outputs/multirun/<date>/<time>")
    parser.add_argument("--tune", metavar="KEY", default=None,
                        help=f"compare settings at their own best value of KEY, chosen on val/loss and reported "
                             f"on test/loss (default: {tuning.TUNE_KEY} whenever the sweep varies it)")
    args = parser.parse_args(argv)
    try:
        write_report(args.sweep_dir, args.tune)
    except ReportError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
