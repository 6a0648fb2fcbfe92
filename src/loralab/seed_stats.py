"""A sweep's settings over their seeds: runs that differ only in ``seed`` are one setting,
summarised by the mean and 95 % CI of each metric and compared with the best setting
(``loralab.stats``: paired by seed where they share seeds, else Welch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loralab import stats

if TYPE_CHECKING:
    from loralab.report import Run

AGGREGATED = ("val/loss", "best/val_loss", "gain/val_loss")  # estimated over seeds
SETTING_COLUMNS = ["setting", "n", "not_completed",
                   *[f"{metric}_{part}" for metric in AGGREGATED for part in ("mean", "std", "ci_low", "ci_high")],
                   "params/trainable", "vs_best_test", "vs_best_diff", "vs_best_ci_low", "vs_best_ci_high",
                   "vs_best_p", "vs_best"]


@dataclass
class Setting:
    name: str
    runs: list[Run]
    estimates: dict[str, stats.Estimate | None]  # None when no seed completed
    vs_best: stats.Comparison | None = None  # None for the best setting itself
    is_best: bool = False

    @property
    def completed(self) -> list[Run]:
        return [run for run in self.runs if run.has_result]

    def by_seed(self, metric: str = "val/loss") -> dict:
        return {run.seed if run.seed is not None else run.job: run.metrics[metric] for run in self.completed}

    @property
    def verdict(self) -> str:
        if self.is_best:
            return "best"
        if self.vs_best is None:
            return "no completed seed"
        if self.vs_best.ci is None:
            return "not comparable: fewer than 2 seeds"
        return "worse" if self.vs_best.distinguishable else "not distinguishable from the best"


def aggregate(runs: list[Run]) -> list[Setting]:
    """One Setting per distinct setting, in job order, each compared with the best (lowest
    mean final val/loss) on the runs' final val/loss."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.setting, []).append(run)
    settings = []
    for name, members in groups.items():
        done = [run for run in members if run.has_result]
        estimates = {m: stats.estimate([run.metrics[m] for run in done]) if done else None for m in AGGREGATED}
        settings.append(Setting(name, members, estimates))
    ranked = [s for s in settings if s.completed]
    if ranked:
        best = min(ranked, key=lambda s: s.estimates["val/loss"].mean)
        best.is_best = True
        for setting in ranked:
            if setting is not best:
                setting.vs_best = stats.compare(setting.by_seed(), best.by_seed())
    return settings


def setting_row(setting: Setting) -> dict:
    row = {"setting": setting.name, "n": len(setting.completed),
           "not_completed": len(setting.runs) - len(setting.completed),
           "params/trainable": next((run.metrics.get("params/trainable") for run in setting.completed), None),
           "vs_best": setting.verdict}
    for metric, est in setting.estimates.items():
        if est is not None:
            low, high = est.ci or (None, None)
            row |= {f"{metric}_mean": est.mean, f"{metric}_std": est.std, f"{metric}_ci_low": low,
                    f"{metric}_ci_high": high}
    if setting.vs_best is not None:
        c = setting.vs_best
        row |= {"vs_best_test": c.test, "vs_best_diff": c.diff, "vs_best_ci_low": c.ci[0] if c.ci else None,
                "vs_best_ci_high": c.ci[1] if c.ci else None, "vs_best_p": c.p_value}
    return row
