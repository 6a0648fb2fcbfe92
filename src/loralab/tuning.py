"""Settings compared at their own best learning rate: chosen on validation, reported on test.

A sweep that varies the learning rate asks a question per setting (which lr is best
for r = 4?) before the one between settings (is r = 4 better than r = 16?). Comparing
settings at one shared lr answers a different question: under Adam, a setting's scale
(alpha / r, LoRA §4.1) acts as a learning-rate multiplier, and full fine-tuning's best
lr is about a tenth of LoRA's ("LoRA Without Regret", Schulman et al. 2025). So each
setting (everything but the lr and the seed) gets the lr with the lowest mean final
val/loss over its seeds, and settings are compared at those lrs on test/loss, which
the choice never saw. Ties go to the smaller lr; an lr at which a seed diverged is
never chosen (it is not stable); a choice at the smallest or largest lr of the grid
may have its optimum outside the grid, and says so.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from loralab import stats
from loralab.layout import SEED_KEY, setting_label

TUNE_KEY = "optim.lr"  # tuned by default whenever a sweep varies it
TUNED_COLUMNS = ["setting", "lr", "n", "val_loss_mean", "test_loss_mean", "test_loss_ci_low", "test_loss_ci_high"]


@dataclass
class LrPoint:
    """The runs of one setting at one lr (None: the lr is not swept)."""

    lr: float | None
    runs: list = field(default_factory=list)

    @property
    def completed(self) -> list:
        return [run for run in self.runs if run.has_result]

    @property
    def unstable(self) -> bool:
        return any(run.status == "diverged" for run in self.runs)

    def estimate(self, metric: str) -> stats.Estimate | None:
        values = [run.metrics[metric] for run in self.completed if metric in run.metrics]
        return stats.estimate(values) if values else None

    def by_seed(self, metric: str) -> dict:
        return {run.seed if run.seed is not None else run.job: run.metrics[metric] for run in self.completed
                if metric in run.metrics}


@dataclass
class TunedSetting:
    """A setting apart from its lr: its runs at each lr of the grid, and the lr chosen on val/loss."""

    name: str
    keys: dict[str, str]  # its own swept keys and values, e.g. {"lora.rank": "4"}
    points: list[LrPoint]  # by increasing lr
    chosen: LrPoint | None = None  # None when no lr has a completed, stable run

    @property
    def at_edge(self) -> bool:
        """The chosen lr is the grid's smallest or largest: the optimum may lie outside it."""
        return self.chosen is not None and len(self.points) > 1 and self.chosen in (self.points[0], self.points[-1])

    @property
    def note(self) -> str:
        if self.chosen is None:
            return "no lr with a completed, stable run"
        if len(self.points) == 1:
            return "one lr: not tuned"
        if self.at_edge:
            side = "smallest" if self.chosen is self.points[0] else "largest"
            return f"at the edge of the grid (its {side} lr): the best lr may lie outside it"
        return ""


def tune(runs: list, key: str = TUNE_KEY) -> list[TunedSetting]:
    """One TunedSetting per setting without ``key`` and the seed, in job order, each with its chosen lr."""
    groups: dict[str, dict[float | None, LrPoint]] = {}
    keys: dict[str, dict[str, str]] = {}
    for run in runs:
        own = {k: override.split("=", 1)[1] for k, override in run.swept.items() if k not in (key, SEED_KEY)}
        name = setting_label(run.swept, (key, SEED_KEY)) or "all runs"
        lr = float(run.swept[key].split("=", 1)[1]) if key in run.swept else None
        keys.setdefault(name, own)
        groups.setdefault(name, {}).setdefault(lr, LrPoint(lr)).runs.append(run)
    settings = []
    for name, by_lr in groups.items():
        points = sorted(by_lr.values(), key=lambda p: -math.inf if p.lr is None else p.lr)
        settings.append(TunedSetting(name, keys[name], points, choose(points)))
    return settings


def choose(points: list[LrPoint]) -> LrPoint | None:
    """The stable lr with the lowest mean final val/loss; on a tie the smaller lr."""
    candidates = [p for p in points if p.completed and not p.unstable]
    if not candidates:
        return None
    return min(candidates, key=lambda p: (p.estimate("val/loss").mean, -math.inf if p.lr is None else p.lr))


def tuned_row(setting: TunedSetting) -> dict:
    """A row of ``tuned.csv``: TUNED_COLUMNS, then the setting's own keys."""
    row = {"setting": setting.name, **setting.keys}
    point = setting.chosen
    if point is None:
        return row | {"n": 0}
    val, test = point.estimate("val/loss"), point.estimate("test/loss")
    row |= {"lr": point.lr, "n": len(point.completed), "val_loss_mean": val.mean}
    if test is not None:
        low, high = test.ci or (None, None)
        row |= {"test_loss_mean": test.mean, "test_loss_ci_low": low, "test_loss_ci_high": high}
    return row


@dataclass
class Pair:
    """``a`` minus ``b`` on test/loss at their chosen lrs, with the raw and the Holm-adjusted p-value."""

    a: TunedSetting
    b: TunedSetting
    comparison: stats.Comparison
    p_adjusted: float


def pairs(settings: list[TunedSetting], metric: str = "test/loss") -> list[Pair]:
    """Every pair of settings with at least 2 completed seeds at their chosen lrs, compared on
    ``metric`` (paired by seed where they share seeds), Holm-adjusted over all the pairs."""
    testable = [s for s in settings if s.chosen is not None and len(s.chosen.by_seed(metric)) >= 2]
    compared = [(a, b, stats.compare(a.chosen.by_seed(metric), b.chosen.by_seed(metric)))
                for a, b in itertools.combinations(testable, 2)]
    compared = [(a, b, c) for a, b, c in compared if c.p_value is not None]
    adjusted = stats.holm([c.p_value for _, _, c in compared])
    return [Pair(a, b, c, p) for (a, b, c), p in zip(compared, adjusted)]
