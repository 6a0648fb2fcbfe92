"""A sweep's settings over their seeds: runs that differ only in ``seed`` are one setting,
summarised by the mean and 95 % CI of each metric and compared with the best setting
(``loralab.stats``: paired by seed where they share seeds, else Welch), the p-values
Holm-adjusted over all the comparisons with the best."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loralab import stats

if TYPE_CHECKING:
    from loralab.report import Run

# estimated over seeds, where the runs measured them (test/loss and forget/* are absent from older runs)
AGGREGATED = ("val/loss", "test/loss", "best/val_loss", "gain/val_loss", "forget/increase")
SETTING_COLUMNS = ["setting", "n", "not_completed",
                   *[f"{metric}_{part}" for metric in AGGREGATED for part in ("mean", "std", "ci_low", "ci_high")],
                   "params/trainable", "vs_best_test", "vs_best_diff", "vs_best_ci_low", "vs_best_ci_high",
                   "vs_best_p", "vs_best_p_holm", "vs_best"]


@dataclass
class Setting:
    name: str
    runs: list[Run]
    estimates: dict[str, stats.Estimate | None]  # None when no completed seed measured the metric
    vs_best: stats.Comparison | None = None  # None for the best setting itself
    p_holm: float | None = None  # vs_best's p-value, Holm-adjusted over the settings compared with the best
    best: str = ""  # the best setting's label: "best", or "best so far (k of N finished)" mid-sweep

    @property
    def completed(self) -> list[Run]:
        return [run for run in self.runs if run.has_result]

    def by_seed(self, metric: str = "val/loss") -> dict:
        return {run.seed if run.seed is not None else run.job: run.metrics[metric] for run in self.completed}

    @property
    def verdict(self) -> str:
        if self.best:
            return self.best
        if self.vs_best is None:
            return "no completed seed"
        if self.p_holm is None:
            return "not comparable: fewer than 2 seeds"
        if self.p_holm < stats.SIGNIFICANCE:
            return "worse beyond noise"
        return stats.not_shown(self.vs_best)


def aggregate(runs: list[Run]) -> list[Setting]:
    """One Setting per distinct setting, in job order, each compared with the best (lowest
    mean final val/loss) on the runs' final val/loss; while jobs of the sweep are still to
    run, the best is only the best so far."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.setting, []).append(run)
    settings = [Setting(name, members, estimates(members)) for name, members in groups.items()]
    ranked = [s for s in settings if s.completed]
    if not ranked:
        return settings
    best = min(ranked, key=lambda s: s.estimates["val/loss"].mean)
    finished = sum(run.finished for run in runs)
    best.best = "best" if finished == len(runs) else f"best so far ({finished} of {len(runs)} finished)"
    others = [s for s in ranked if s is not best]
    for setting in others:
        setting.vs_best = stats.compare(setting.by_seed(), best.by_seed())
    tested = [s for s in others if s.vs_best.p_value is not None]
    for setting, p in zip(tested, stats.holm([s.vs_best.p_value for s in tested])):
        setting.p_holm = p
    return settings


def estimates(members: list[Run]) -> dict[str, stats.Estimate | None]:
    done = [run for run in members if run.has_result]
    values = {m: [run.metrics[m] for run in done if m in run.metrics] for m in AGGREGATED}
    return {m: stats.estimate(v) if v else None for m, v in values.items()}


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
                "vs_best_ci_high": c.ci[1] if c.ci else None, "vs_best_p": c.p_value, "vs_best_p_holm": setting.p_holm}
    return row
