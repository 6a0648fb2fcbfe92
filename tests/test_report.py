"""The sweep report: written at the end of a real multirun (seeds, and the baseline in the
same sweep), its numbers are the runs' own, its statistics are checked by hand, its plots
draw what they claim, and the CLI rebuilds it from disk."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loralab.overrides import varying_keys
from loralab.report import write_report

from conftest import read_summary as summary

PLOTS = ("loss_curves.png", "val_loss_vs_rank.png", "val_loss_vs_params.png", "learning_vs_forgetting.png")


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))



@pytest.mark.slow
def test_multirun_ends_with_one_row_per_job_and_one_per_setting(rank_sweep):
    """`-m lora=default,full lora.rank=2,4 seed=1,2`: 4 LoRA jobs and the baseline once per seed."""
    sweep_dir, result = rank_sweep
    rows = read_csv(sweep_dir / "report.csv")
    assert [(r["overrides"], r["status"]) for r in rows] == [
        ("lora=default,lora.rank=2,seed=1", "completed"), ("lora=default,lora.rank=2,seed=2", "completed"),
        ("lora=default,lora.rank=4,seed=1", "completed"), ("lora=default,lora.rank=4,seed=2", "completed"),
        ("lora=full,lora.rank=2,seed=1", "completed"), ("lora=full,lora.rank=2,seed=2", "completed")]
    for row in rows:
        metrics = summary(sweep_dir / row["job"])["metrics"]
        for name in ("val/loss", "best/val_loss", "base/val_loss", "gain/val_loss", "val/ppl",
                     "params/trainable_pct", "perf/tokens_per_s"):
            assert float(row[name]) == metrics[name], name
        assert int(row["params/trainable"]) == metrics["params/trainable"]
    settings = {r["setting"]: r for r in read_csv(sweep_dir / "settings.csv")}
    assert list(settings) == ["lora=default,lora.rank=2", "lora=default,lora.rank=4", "lora=full,lora.rank=2"]
    for name, jobs in (("lora=default,lora.rank=2", rows[:2]), ("lora=full,lora.rank=2", rows[4:])):
        losses = [summary(sweep_dir / r["job"])["metrics"]["val/loss"] for r in jobs]
        assert settings[name]["n"] == "2" and float(settings[name]["val/loss_mean"]) == pytest.approx(sum(losses) / 2)
    assert float(settings["lora=full,lora.rank=2"]["params/trainable"]) == float(rows[4]["params/trainable"])
    markdown = (sweep_dir / "report.md").read_text()
    assert "Best setting: **" in markdown and all(f"![{name}]({name})" in markdown for name in PLOTS)
    assert "| setting | n | not completed |" in result.stdout  # printed at the end of the sweep


@pytest.mark.slow
def test_plots_are_non_empty_images(rank_sweep):
    from matplotlib.image import imread

    sweep_dir, _ = rank_sweep
    for name in PLOTS:
        png = sweep_dir / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        pixels = imread(png)[..., :3]
        assert (pixels < 0.9).any(), f"{name} is blank"


@pytest.mark.slow
def test_cli_rebuilds_the_same_report_from_disk(rank_sweep):
    sweep_dir, _ = rank_sweep
    before = (sweep_dir / "report.csv").read_text()
    result = subprocess.run([sys.executable, "-m", "loralab.report", str(sweep_dir)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (sweep_dir / "report.csv").read_text() == before
    assert "| lora=default,lora.rank=4 | 2 | 0 |" in result.stdout


@pytest.mark.parametrize("make", [lambda tmp: tmp / "no-such-sweep", lambda tmp: tmp], ids=["missing", "empty"])
def test_cli_names_a_path_that_is_not_a_sweep(tmp_path, make):
    path = make(tmp_path)
    result = subprocess.run([sys.executable, "-m", "loralab.report", str(path)], capture_output=True, text=True)
    assert result.returncode == 2  # argparse's usage error
    assert str(path) in result.stderr and "Traceback" not in result.stderr


def fake_job(sweep_dir: Path, job: str, overrides: list[str], summary: dict | None) -> None:
    (sweep_dir / job / ".hydra").mkdir(parents=True)
    (sweep_dir / job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (sweep_dir / job / "summary.json").write_text(json.dumps({"overrides": overrides, **summary}))


def seeded_sweep(sweep_dir: Path, losses: dict[int, list[float | None]], measured: bool = False) -> None:
    """A fake `-m lora.rank=... seed=1,2,3` sweep: losses[rank][i] is seed i+1's final val/loss
    (None: that seed failed); ``measured``: the runs also measured test/loss (val/loss + 0.05)
    and forgetting (forget/increase = seed / 100), as runs since the test split do."""
    job = 0
    for rank, values in losses.items():
        for seed, loss in enumerate(values, start=1):
            metrics = {"val/loss": loss, "best/val_loss": loss, "base/val_loss": 2.5,
                       "gain/val_loss": 2.5 - loss, "params/trainable": 100 * rank} if loss else {}
            if loss and measured:
                metrics |= {"test/loss": loss + 0.05, "base/test_loss": 2.6, "forget/increase": seed / 100}
            history = {"train/loss": [[1, 3.0], [2, loss]], "val/loss": [[0, 2.5], [2, loss]]} if loss else {}
            fake_job(sweep_dir, str(job), [f"lora.rank={rank}", f"seed={seed}"],
                     {"status": "completed" if loss else "failed", "error": None if loss else "boom",
                      "metrics": metrics, "history": history,
                      "config": {"seed": seed, "lora": {"enabled": True, "rank": rank}}})
            job += 1


def test_seeds_of_one_setting_are_aggregated_and_compared_with_the_best(tmp_path):
    seeded_sweep(tmp_path, {4: [2.10, 2.12, 2.14], 8: [2.00, 2.03, 2.06], 16: [2.04, 2.03, None]})
    write_report(tmp_path)
    rows = {row["setting"]: row for row in read_csv(tmp_path / "settings.csv")}
    assert list(rows) == ["lora.rank=4", "lora.rank=8", "lora.rank=16"]
    r4, r8, r16 = rows["lora.rank=4"], rows["lora.rank=8"], rows["lora.rank=16"]
    assert (r4["n"], r4["not_completed"], r16["n"], r16["not_completed"]) == ("3", "0", "2", "1")  # the failed seed
    assert float(r4["val/loss_mean"]) == pytest.approx(2.12)
    assert float(r4["val/loss_std"]) == pytest.approx(0.02)  # sqrt((0.02² + 0 + 0.02²) / 2)
    half = 4.302652729911275 * 0.02 / 3**0.5  # t(0.975, 2) · s / sqrt(n)
    assert (float(r4["val/loss_ci_low"]), float(r4["val/loss_ci_high"])) == pytest.approx((2.12 - half, 2.12 + half))
    assert r8["vs_best"] == "best" and r8["vs_best_p_holm"] == ""
    # rank 4 against rank 8, paired by seed: differences 0.10, 0.09, 0.08, so t = 0.09 / (0.01 / √3),
    # t² = 243, and with 2 degrees of freedom p = 1 − t / √(2 + t²) = 1 − √(243 / 245)
    p4 = 1 - math.sqrt(243 / 245)
    assert r4["vs_best_test"] == "paired t" and float(r4["vs_best_diff"]) == pytest.approx(0.09)
    assert float(r4["vs_best_p"]) == pytest.approx(p4)
    # rank 16 ran seeds 1 and 2 only: Welch, and 2.035 vs 2.03 is within the noise
    p16 = welch_p([2.04, 2.03], [2.00, 2.03, 2.06])
    assert r16["vs_best_test"] == "Welch t" and float(r16["vs_best_p"]) == pytest.approx(p16)
    # Holm over the 2 comparisons with the best: the smaller p doubled, the larger kept (p16 > 2·p4)
    assert float(r4["vs_best_p_holm"]) == pytest.approx(2 * p4) and float(r16["vs_best_p_holm"]) == pytest.approx(p16)
    assert r4["vs_best"] == "worse beyond noise"
    bound = 0.005 + welch_half_width([2.04, 2.03], [2.00, 2.03, 2.06])  # |diff| + the CI's half-width
    assert r16["vs_best"] == f"not shown at 2 seeds, |diff| < {bound:.4f}"
    markdown = (tmp_path / "report.md").read_text()
    assert "Best setting: **lora.rank=8**" in markdown and "best so far" not in markdown
    assert f"p = {p4:.3g} (Holm p = {2 * p4:.3g}, paired t): worse beyond noise." in markdown
    assert "- lora.rank=16: -" not in markdown and f"not shown at 2 seeds, |diff| < {bound:.4f}" in markdown
    assert "distinguishable" not in markdown and ": the same" not in markdown


def welch_p(a: list[float], b: list[float]) -> float:
    from scipy.stats import ttest_ind

    return ttest_ind(a, b, equal_var=False).pvalue


def welch_half_width(a: list[float], b: list[float]) -> float:
    """t(0.975, Welch–Satterthwaite df) times the standard error of the difference of means."""
    from scipy.stats import t

    va, vb = [sum((x - sum(v) / len(v)) ** 2 for x in v) / (len(v) - 1) / len(v) for v in (a, b)]
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t.ppf(0.975, df) * math.sqrt(va + vb)


def test_a_difference_beyond_raw_noise_but_not_after_holm_is_not_shown(tmp_path):
    # ranks 4 and 16 each against rank 8: paired differences 0.05, 0.06, 0.03 and 0.06, 0.05, 0.03, so
    # t² = 28 and p = 1 − √(28 / 30) = 0.034 each, below 0.05; Holm over the 2: 2 · 0.034 = 0.068 for both
    seeded_sweep(tmp_path, {4: [2.05, 2.09, 2.09], 8: [2.00, 2.03, 2.06], 16: [2.06, 2.08, 2.09]})
    write_report(tmp_path)
    rows = {row["setting"]: row for row in read_csv(tmp_path / "settings.csv")}
    raw = 1 - math.sqrt(28 / 30)
    half = 4.302652729911275 * math.sqrt(0.0007 / 3) / math.sqrt(3)  # t(0.975, 2) · s / √3, s² = 0.0007 / 3
    for name in ("lora.rank=4", "lora.rank=16"):
        assert float(rows[name]["vs_best_p"]) == pytest.approx(raw)
        assert float(rows[name]["vs_best_p_holm"]) == pytest.approx(2 * raw)
        assert rows[name]["vs_best"] == f"not shown at 3 seeds, |diff| < {0.14 / 3 + half:.4f}"
    table = (tmp_path / "report.md").read_text().split("## Comparisons")[0]
    assert f"| {raw:.3g} | {2 * raw:.3g} | not shown at 3 seeds" in table


def test_settings_carry_test_loss_and_forgetting_beside_val_loss(tmp_path):
    seeded_sweep(tmp_path, {4: [2.10, 2.12, 2.14], 8: [2.00, 2.03, 2.06]}, measured=True)
    write_report(tmp_path)
    r4 = {row["setting"]: row for row in read_csv(tmp_path / "settings.csv")}["lora.rank=4"]
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2) / √n, times the std
    assert float(r4["test/loss_mean"]) == pytest.approx(2.17) and float(r4["test/loss_std"]) == pytest.approx(0.02)
    assert float(r4["test/loss_ci_high"]) == pytest.approx(2.17 + 0.02 * half)
    assert float(r4["forget/increase_mean"]) == pytest.approx(0.02)  # seeds 1, 2, 3: 0.01, 0.02, 0.03
    assert float(r4["forget/increase_ci_low"]) == pytest.approx(0.02 - 0.01 * half)
    markdown = (tmp_path / "report.md").read_text()
    assert f"| 2.1700 ± {0.02 * half:.4f} |" in markdown and f"| +0.0200 ± {0.01 * half:.4f} |" in markdown
    # a sweep without an lr to tune still draws the learning–forgetting plane, one point per setting
    assert "![learning_vs_forgetting.png](learning_vs_forgetting.png)" in markdown

    seeded_sweep(tmp_path / "older", {4: [2.10, 2.12, 2.14]})  # runs from before test/loss: blank, no error
    write_report(tmp_path / "older")
    [row] = read_csv(tmp_path / "older" / "settings.csv")
    assert row["test/loss_mean"] == row["forget/increase_mean"] == "" and row["val/loss_mean"] != ""


def test_no_best_setting_is_named_while_jobs_are_still_to_run(tmp_path, capsys):
    seeded_sweep(tmp_path, {4: [2.10, 2.12, 2.14], 8: [2.00, 2.03]})
    fake_job(tmp_path, "5", ["lora.rank=8", "seed=3"], None)  # still running: no summary.json yet
    write_report(tmp_path)
    markdown, console = (tmp_path / "report.md").read_text(), capsys.readouterr().out
    for text in (markdown, console):
        assert "Best so far (5 of 6 finished): **lora.rank=8**" in text
        assert "best setting" not in text.lower()
    rows = {row["setting"]: row for row in read_csv(tmp_path / "settings.csv")}
    assert rows["lora.rank=8"]["vs_best"] == "best so far (5 of 6 finished)"
    assert "## Comparisons with the best so far (5 of 6 finished)" in markdown

    (tmp_path / "5" / "summary.json").write_text(json.dumps({  # the last job ends, failed: all 6 are done
        "overrides": ["lora.rank=8", "seed=3"], "status": "failed", "error": "boom", "metrics": {},
        "config": {"seed": 3, "lora": {"enabled": True, "rank": 8}}}))
    write_report(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "Best setting: **lora.rank=8**" in markdown and "so far" not in markdown


def paired_line(a: int, b: int, diffs: list[float]) -> str:
    """The report's line for rank a minus rank b, with the paired t-interval computed by hand."""
    mean = sum(diffs) / len(diffs)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    half = 4.302652729911275 * std / math.sqrt(3)  # t(0.975, df=2)
    return f"- lora.rank={a} − lora.rank={b}: {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}], p = "


def test_every_pair_of_settings_is_compared_not_only_with_the_best(tmp_path):
    from scipy.stats import ttest_rel

    losses = {4: [2.10, 2.12, 2.14], 8: [2.00, 2.03, 2.06], 16: [2.05, 2.07, 2.11], 32: [2.06, 2.04, 2.09]}
    seeded_sweep(tmp_path, losses)
    write_report(tmp_path)
    pairs = (tmp_path / "report.md").read_text().split("## Every pair of settings")[1].split("## Runs")[0]
    lines = [line for line in pairs.splitlines() if line.startswith("- ")]
    assert len(lines) == 6  # 4 settings: 4·3/2 pairs
    raw = {(a, b): ttest_rel(losses[a], losses[b]).pvalue for a, b in [(4, 8), (4, 16), (8, 16)]}
    # Holm over the 6 pairs, by hand: raw p 0.00409 (4−8), 0.00506 (8−16), 0.0229 (4−16), 0.0422, 0.149,
    # 0.383 are multiplied by 6, 5, 4, ...: 4−8 -> 0.0245, 8−16 -> 0.0253 differ; 4−16 -> 0.0914 does not
    r4_r8 = next(line for line in lines if line.startswith(paired_line(4, 8, [0.10, 0.09, 0.08])))
    assert r4_r8.endswith(f"p = {raw[4, 8]:.3g} (Holm p = {6 * raw[4, 8]:.3g}, paired t): "
                          "lora.rank=8 has the lower val/loss.")
    r8_r16 = next(line for line in lines if line.startswith(paired_line(8, 16, [-0.05, -0.04, -0.05])))
    assert r8_r16.endswith(f"(Holm p = {5 * raw[8, 16]:.3g}, paired t): lora.rank=8 has the lower val/loss.")
    # significant before the correction (p = 0.023), not after it: not shown, and bounded by its CI
    r4_r16 = next(line for line in lines if line.startswith(paired_line(4, 16, [0.05, 0.05, 0.03])))
    bound = 0.05 / 1.5 + 0.01 + 4.302652729911275 * math.sqrt(0.0004 / 3) / math.sqrt(3)  # mean + half-width
    assert r4_r16.endswith(f"(Holm p = {4 * raw[4, 16]:.3g}, paired t): not shown at 3 seeds, |diff| < {bound:.4f}.")

    seeded_sweep(tmp_path / "two", {4: [2.10, 2.12, 2.14], 8: [2.00, 2.03, 2.06]})
    write_report(tmp_path / "two")  # the one pair is the comparison with the best
    assert "## Every pair of settings" not in (tmp_path / "two" / "report.md").read_text()


def test_a_single_seed_says_it_has_no_uncertainty_estimate(tmp_path):
    seeded_sweep(tmp_path, {4: [2.1], 8: [2.0]})
    write_report(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "2.1000 (1 seed: no uncertainty estimate)" in markdown and "± 0.0000" not in markdown
    assert "not comparable: fewer than 2 seeds" in markdown


def test_plots_draw_the_means_and_confidence_intervals(tmp_path):
    from loralab import stats
    from loralab.plots import SweepResults, plot_loss_curves, plot_val_loss_vs_rank
    from loralab.report import load_runs
    from loralab.seed_stats import aggregate

    seeded_sweep(tmp_path, {4: [2.10, 2.12, 2.14], 8: [2.00, 2.03, 2.06]})
    runs = load_runs(tmp_path)
    sweep = SweepResults(runs, aggregate(runs), [], None)
    [bars] = plot_val_loss_vs_rank(sweep).axes[0].containers
    line, _, (segments,) = bars
    assert list(line.get_xdata()) == [4, 8] and list(line.get_ydata()) == pytest.approx([2.12, 2.03])
    expected = stats.estimate([2.10, 2.12, 2.14]).ci
    assert tuple(segments.get_segments()[0][:, 1]) == pytest.approx(expected)  # rank 4's bar is its CI
    train_ax = plot_loss_curves(sweep).axes[0]
    assert list(train_ax.lines[0].get_ydata()) == pytest.approx([3.0, 2.12])  # mean curve of rank 4


def test_plots_label_ranks_and_targets_and_every_panel_has_a_legend(tmp_path):
    from loralab.plots import SweepResults, plot_loss_curves, plot_val_loss_vs_params
    from loralab.report import aggregate, load_runs

    job = 0
    for budget, rank in (("q", 8), ("qv", 4)):  # what experiment=target_modules sweeps
        for seed in (1, 2):
            loss = 2.0 + rank / 100 + seed / 1000
            fake_job(tmp_path, str(job), [f"+lora/budget={budget}", f"seed={seed}"],
                     {"status": "completed", "error": None,
                      "history": {"train/loss": [[1, 3.0]], "val/loss": [[1, loss]]},
                      "metrics": {"val/loss": loss, "best/val_loss": loss, "base/val_loss": 2.5,
                                  "gain/val_loss": 2.5 - loss, "params/trainable": 1000 * rank},
                      "config": {"seed": seed, "lora": {"enabled": True, "rank": rank}}})
            job += 1
    runs = load_runs(tmp_path)
    sweep = SweepResults(runs, aggregate(runs), [], None)
    params_ax = plot_val_loss_vs_params(sweep).axes[0]
    assert sorted(text.get_text() for text in params_ax.texts) == ["r=4", "r=8"]
    legend = [text.get_text() for text in params_ax.get_legend().get_texts()]
    assert "targets=q" in legend and "targets=qv" in legend and not any("+lora/budget" in text for text in legend)
    for ax in plot_loss_curves(sweep).axes:
        assert [text.get_text() for text in ax.get_legend().get_texts()] == ["targets=q (n=2)", "targets=qv (n=2)"]


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


def test_the_report_links_the_adapter_analysis_once_it_exists(tmp_path):
    seeded_sweep(tmp_path, {4: [2.1], 8: [2.0]})
    write_report(tmp_path)
    assert f"`python -m loralab.analyze {tmp_path}` writes `analysis.md`" in (tmp_path / "report.md").read_text()
    (tmp_path / "analysis.md").write_text("# analysis\n")
    write_report(tmp_path)
    assert "[analysis.md](analysis.md)" in (tmp_path / "report.md").read_text()


# --- the report survives its inputs ----------------------------------------------------


def job_with_summary_text(sweep_dir: Path, job: str, overrides: list[str], summary_text: str | None) -> None:
    """A job directory whose summary.json holds ``summary_text`` as it is (None: no summary)."""
    (sweep_dir / job / ".hydra").mkdir(parents=True)
    (sweep_dir / job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary_text is not None:
        (sweep_dir / job / "summary.json").write_text(summary_text)


def completed_summary(overrides: list[str], val_loss: float) -> str:
    return json.dumps({"status": "completed", "error": None, "overrides": overrides, "wall_time_s": 1.0,
                       "metrics": {"val/loss": val_loss, "best/val_loss": val_loss, "gain/val_loss": 0.1,
                                   "params/trainable": 10},
                       "history": {"train/loss": [[1, 3.0], [2, 2.0]], "val/loss": [[0, 3.0], [2, val_loss]]},
                       "config": {"seed": 1, "lora": {"enabled": True, "rank": 2}}})


def test_report_shows_unreadable_summaries_and_jobs_that_never_started(tmp_path):
    import csv

    from loralab.report import write_report

    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    # the sweep `-m lora=default,full lora.rank=2,4`: full fine-tuning runs once, so 3 jobs
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"overrides": {"task": ["lora=default,full", "lora.rank=2,4"]}, "sweeper": {"params": None}}}))
    job_with_summary_text(sweep_dir, "0", ["lora=default", "lora.rank=2"],
                          completed_summary(["lora=default", "lora.rank=2"], 2.5))
    job_with_summary_text(sweep_dir, "1", ["lora=default", "lora.rank=4"], '{"status": "compl')  # cut off mid-write
    write_report(sweep_dir)
    rows = list(csv.DictReader((sweep_dir / "report.csv").open()))
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [
        ("0", "lora=default,lora.rank=2", "completed"), ("1", "lora=default,lora.rank=4", "unreadable"),
        ("2", "lora=full,lora.rank=2", "not started")]
    assert rows[0]["val/loss"] == "2.5"
    assert rows[1]["error"].startswith(f"unreadable: {sweep_dir / '1' / 'summary.json'}: JSONDecodeError")
    assert "never started" in rows[2]["error"]


@pytest.mark.parametrize("garbage", ["[1, 2]", '{"no": "status"}', '{"status": "completed", "metrics": 3}',
                                     '{"status": "completed", "history": {"val/loss": [[0]]}}', "\x00\x01"])
def test_any_garbage_summary_is_its_row_and_the_rest_of_the_report_is_built(tmp_path, garbage):
    import csv

    from loralab.report import write_report

    job_with_summary_text(tmp_path, "0", ["lora.rank=2"], completed_summary(["lora.rank=2"], 2.5))
    job_with_summary_text(tmp_path, "1", ["lora.rank=4"], garbage)
    write_report(tmp_path)
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [(r["overrides"], r["status"]) for r in rows] == [("lora.rank=2", "completed"),
                                                             ("lora.rank=4", "unreadable")]
    assert rows[1]["error"].startswith("unreadable: ")
    assert (tmp_path / "loss_curves.png").is_file()  # the plots of the readable run were drawn


def test_values_from_a_summary_are_escaped_and_each_run_stays_one_table_row(tmp_path):
    import re

    from loralab.report import COLUMNS, write_report

    planted = ["lora.rank=4", "data.train_path='a|b<script>alert(1)</script>'"]
    job_with_summary_text(tmp_path, "0", ["lora.rank=2"], completed_summary(["lora.rank=2"], 2.5))
    job_with_summary_text(tmp_path, "1", planted, json.dumps({**json.loads(completed_summary(planted, 2.4)),
                                                              "status": "<img src=x onerror=alert(1)>|",
                                                              "error": "<b>x</b> | y\n| 9 | forged row |"}))
    write_report(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "<script" not in markdown and "<img" not in markdown and "<b>" not in markdown
    [row] = [line for line in markdown.splitlines() if line.startswith("| 1 |")]
    assert len(re.findall(r"(?<!\\)\|", row)) == len(COLUMNS) + 1  # a cell's own | is escaped
    assert r"a\|b&lt;script&gt;alert(1)&lt;/script&gt;" in row and r"&lt;img src=x onerror=alert(1)&gt;\|" in row
    assert r"&lt;b&gt;x&lt;/b&gt; \| y" in row and "forged row" not in markdown  # an error's first line only
    setting = r"data.train_path='a\|b&lt;script&gt;alert(1)&lt;/script&gt;'"
    [setting_row] = [line for line in markdown.splitlines() if line.startswith("| lora.rank=4,data")]
    assert setting in setting_row and len(re.findall(r"(?<!\\)\|", setting_row)) == 14
