"""The sweep report's plots: what a researcher asks of a sweep, one figure each, always with
the uncertainty over seeds. Each drawing returns a matplotlib Figure, or None when the
sweep has nothing to draw for it.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loralab import stats
from loralab.files import write_atomic
from loralab.layout import RANK_KEY, SEED_KEY, setting_label
from loralab.tuning import TunedSetting

if TYPE_CHECKING:
    from loralab.report import Run
    from loralab.seed_stats import Setting


@dataclass
class SweepResults:
    """What the plots draw from: the runs, their settings over seeds, and the settings at their tuned lr."""

    runs: list[Run]
    settings: list[Setting]
    tuned: list[TunedSetting]
    tune_key: str | None  # the key tuned (optim.lr), None when the sweep does not vary it


def write_plots(sweep: SweepResults, sweep_dir: Path) -> dict[str, str]:
    """Draw each plot that has data; return {file name: why not} for those that have none."""
    skipped = {}
    for name, draw, why_not in PLOTS:
        figure = draw(sweep)
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


def mean_curve(runs: list[Run], metric: str) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean, std) of ``metric``'s curve over runs, at the steps every run logged."""
    curves = [dict(map(tuple, run.history[metric])) for run in runs]
    steps = sorted(set.intersection(*(set(curve) for curve in curves)))
    values = [[curve[step] for curve in curves] for step in steps]
    means = [sum(v) / len(v) for v in values]
    stds = [math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
            for v, m in zip(values, means)]
    return steps, means, stds


def plot_loss_curves(sweep: SweepResults):
    drawn = [s for s in sweep.settings if s.completed and all(run.history.get("train/loss") for run in s.completed)]
    if not drawn:
        return None
    figure, (train_ax, val_ax) = new_axes("Loss curves: mean over seeds, band ± 1 std", "step", "loss", ncols=2)
    train_ax.set_title("train/loss")
    val_ax.set_title("val/loss (step 0: the base model)")
    for setting in drawn:
        label = f"{readable(setting.name)} (n={len(setting.completed)})"
        for ax, metric in ((train_ax, "train/loss"), (val_ax, "val/loss")):
            steps, means, stds = mean_curve(setting.completed, metric)
            [line] = ax.plot(steps, means, linewidth=1, marker="o" if metric == "val/loss" else None, label=label)
            ax.fill_between(steps, [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)],
                            color=line.get_color(), alpha=0.2)
    train_ax.legend(fontsize="small")
    val_ax.legend(fontsize="small")
    return figure


def readable(overrides: str) -> str:
    """Hydra's overrides as a legend reads them: ``+lora/budget=q`` and ``lora/targets=q`` are
    ``targets=q``; no ``+`` prefixes."""
    overrides = re.sub(r"(^|,)\+{0,2}lora/(budget|targets)=", r"\1targets=", overrides)
    return re.sub(r"(^|,)[+~]{1,2}", r"\1", overrides)


def line_label(setting: Setting) -> str:
    """The setting's swept overrides other than the rank and the seed: one line per value."""
    swept = setting.completed[0].swept
    return readable(setting_label(swept, leave_out=(RANK_KEY, SEED_KEY))) or "LoRA"


def ci_half_width(est: stats.Estimate) -> float:
    """An error bar: the 95 % CI's half-width, none for a single seed."""
    return est.half_width or 0.0


def draw_references(ax, settings: list[Setting], runs: list[Run]) -> None:
    """Full fine-tuning as a band (mean ± CI) and the untouched base as a line."""
    for setting in settings:
        est = setting.estimates["val/loss"]
        if est is None or not setting.completed[0].is_full:
            continue
        line = ax.axhline(est.mean, color="black", linestyle="--", label=f"full fine-tuning (n={est.n})")
        if est.ci:
            ax.axhspan(*est.ci, color=line.get_color(), alpha=0.1)
    bases = [run.metrics["base/val_loss"] for run in runs if run.has_result and "base/val_loss" in run.metrics]
    if bases:
        ax.axhline(sum(bases) / len(bases), color="gray", linestyle=":", label="base, not fine-tuned")


def plot_val_loss_vs_rank(sweep: SweepResults):
    lora = [s for s in sweep.settings if s.completed and s.completed[0].rank is not None]
    ranks = sorted({s.completed[0].rank for s in lora})
    if len(ranks) < 2:
        return None
    figure, [ax] = new_axes("Final val/loss against LoRA rank (mean ± 95 % CI over seeds)", "lora.rank", "val/loss")
    for name in dict.fromkeys(line_label(s) for s in lora):
        points = sorted((s.completed[0].rank, s.estimates["val/loss"]) for s in lora if line_label(s) == name)
        ax.errorbar([r for r, _ in points], [e.mean for _, e in points], yerr=[ci_half_width(e) for _, e in points],
                    marker="o", capsize=3, label=name)
    draw_references(ax, sweep.settings, sweep.runs)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(rank) for rank in ranks])
    ax.minorticks_off()
    ax.legend(fontsize="small")
    return figure


def plot_val_loss_vs_params(sweep: SweepResults):
    done = [s for s in sweep.settings if s.completed]
    if not done:
        return None
    figure, [ax] = new_axes("Final val/loss against trainable parameters (mean ± 95 % CI)", "params/trainable",
                            "val/loss")
    points = [(s.completed[0].metrics["params/trainable"], s.estimates["val/loss"], s) for s in done]
    for name in dict.fromkeys(line_label(s) for _, _, s in points if not s.completed[0].is_full):
        mine = [(p, e) for p, e, s in points if not s.completed[0].is_full and line_label(s) == name]
        ax.errorbar([p for p, _ in mine], [e.mean for _, e in mine], yerr=[ci_half_width(e) for _, e in mine],
                    linestyle="none", marker="o", capsize=3, label=name)
    for params, est, s in points:
        if s.completed[0].rank is not None:  # which rank each point is
            ax.annotate(f"r={s.completed[0].rank}", (params, est.mean), textcoords="offset points", xytext=(5, 5),
                        fontsize="x-small")
    for params, est, s in points:
        if s.completed[0].is_full:
            ax.errorbar([params], [est.mean], yerr=[ci_half_width(est)], marker="*", markersize=14, color="black",
                        capsize=3, label=f"full fine-tuning (n={est.n})")
    ax.step(*zip(*frontier([(p, e.mean) for p, e, _ in points])), where="post", color="gray", linestyle=":",
            label="frontier (of the means)")
    ax.set_xscale("log")
    ax.legend(fontsize="small")
    return figure


def frontier(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The (params, val/loss) points no cheaper point beats: the efficiency frontier."""
    best = []
    for params, loss in sorted(points):
        if not best or loss < best[-1][1]:
            best.append((params, loss))
    return best


def plot_val_loss_vs_lr(sweep: SweepResults):
    """Each setting's final val/loss over its lr grid (mean, band: 95 % CI), the chosen lr ringed."""
    drawn = [t for t in sweep.tuned if t.chosen is not None and sum(p.lr is not None for p in t.points) >= 2]
    if sweep.tune_key is None or not drawn:
        return None
    figure, [ax] = new_axes(f"Final val/loss against {sweep.tune_key} (mean, band 95 % CI; ringed: chosen)",
                            sweep.tune_key, "val/loss")
    for setting in drawn:
        points = [(p.lr, p.estimate("val/loss")) for p in setting.points if p.lr is not None and p.completed]
        lrs, means = [lr for lr, _ in points], [e.mean for _, e in points]
        half = [ci_half_width(e) for _, e in points]
        [line] = ax.plot(lrs, means, marker="o", label=f"{setting.name} (n={len(setting.chosen.completed)})")
        ax.fill_between(lrs, [m - h for m, h in zip(means, half)], [m + h for m, h in zip(means, half)],
                        color=line.get_color(), alpha=0.15)
        ax.plot([setting.chosen.lr], [setting.chosen.estimate("val/loss").mean], marker="o", markersize=14,
                markerfacecolor="none", color=line.get_color())
    ax.set_xscale("log")
    ax.legend(fontsize="small")
    return figure


def learning_and_forgetting(point) -> tuple[stats.Estimate, stats.Estimate] | None:
    """(gain on the target's test split, increase of the loss on the base's own domain) over
    the seeds of one lr point; None when its runs did not measure forgetting."""
    done = [run for run in point.completed if {"test/loss", "base/test_loss", "forget/increase"} <= run.metrics.keys()]
    if not done:
        return None
    learned = stats.estimate([run.metrics["base/test_loss"] - run.metrics["test/loss"] for run in done])
    return learned, stats.estimate([run.metrics["forget/increase"] for run in done])


def plot_learning_vs_forgetting(sweep: SweepResults):
    """The learning–forgetting plane of Biderman et al. 2024 ("LoRA Learns Less and Forgets
    Less", Fig. 1): one point per setting (at its chosen lr when the lr is tuned), error
    bars the 95 % CIs over seeds both ways."""
    points = [(t, learning_and_forgetting(t.chosen)) for t in sweep.tuned if t.chosen is not None]
    points = [(t, measured) for t, measured in points if measured is not None]
    if not points:
        return None
    at = f" at its chosen {sweep.tune_key}" if sweep.tune_key else ""
    figure, [ax] = new_axes(f"Learning against forgetting: each setting{at}\n(mean ± 95 % CI over seeds)",
                            "learning: base/test_loss − test/loss (target)",
                            "forgetting: forget/increase (the base's own domain)")
    for setting, (learned, forgot) in points:
        ax.errorbar([learned.mean], [forgot.mean], xerr=[ci_half_width(learned)], yerr=[ci_half_width(forgot)],
                    marker="*" if setting.chosen.completed[0].is_full else "o", capsize=3,
                    label=f"{setting.name} (n={learned.n})")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.legend(fontsize="small")
    return figure


PLOTS = (  # (file name, drawing, why it may have nothing to draw)
    ("loss_curves.png", plot_loss_curves, "no run completed"),
    ("val_loss_vs_rank.png", plot_val_loss_vs_rank, "fewer than two LoRA ranks completed"),
    ("val_loss_vs_params.png", plot_val_loss_vs_params, "no run completed"),
    ("val_loss_vs_lr.png", plot_val_loss_vs_lr, "the sweep does not vary the learning rate"),
    ("learning_vs_forgetting.png", plot_learning_vs_forgetting, "no completed run measured forgetting"),
)
