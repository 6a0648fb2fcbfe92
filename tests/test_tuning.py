"""Settings compared at their own best learning rate: the choice on val/loss, the comparison on
test/loss, against a hand-built sweep whose right answers are known."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from loralab import stats
from loralab.report import write_report

# the hand-built val/losses of two settings differ by the same constant at every seed: scipy warns
pytestmark = pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")

OFFSETS = (-0.01, 0.0, 0.01)  # seeds 1, 2, 3 around each mean val/loss
# (rank, lr) -> mean val/loss over seeds; None for a seed that diverged
GRID = {
    (4, 1e-3): 2.20, (4, 1e-2): 2.00, (4, 1e-1): 1.90,  # 1e-1 is lowest but a seed diverged there
    (8, 1e-3): 2.30, (8, 1e-2): 2.20, (8, 1e-1): 2.10,  # the best is the grid's largest: an edge
    (16, 1e-3): 2.20, (16, 1e-2): 2.05, (16, 1e-1): 2.05,  # a tie: the smaller lr
    (32, 1e-2): 2.15,  # one lr only
}
DIVERGED = {(4, 1e-1, 2)}
# test/loss by seed at the lr each setting should choose
TEST = {4: [1.90, 1.92, 1.94], 8: [2.00, 2.04, 2.05], 16: [1.91, 1.95, 1.93], 32: [2.10, 2.11, 2.15]}
CHOSEN = {4: 1e-2, 8: 1e-1, 16: 1e-2, 32: 1e-2}


def hand_built_sweep(sweep_dir: Path) -> None:
    job = 0
    for (rank, lr), val in GRID.items():
        for seed, offset in enumerate(OFFSETS, start=1):
            overrides = [f"lora.rank={rank}", f"optim.lr={lr}", f"seed={seed}"]
            diverged = (rank, lr, seed) in DIVERGED
            test = TEST[rank][seed - 1] if CHOSEN[rank] == lr else val + 0.05
            metrics = {} if diverged else {
                "val/loss": val + offset, "best/val_loss": val + offset, "gain/val_loss": 2.5 - val - offset,
                "test/loss": test, "base/test_loss": 2.5, "base/val_loss": 2.5,
                "forget/increase": 0.01 * rank + offset, "params/trainable": 100 * rank}
            (sweep_dir / str(job) / ".hydra").mkdir(parents=True)
            (sweep_dir / str(job) / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
            summary = {"overrides": overrides, "status": "diverged" if diverged else "completed", "error": None,
                       "metrics": metrics, "config": {"seed": seed, "lora": {"enabled": True, "rank": rank}}}
            (sweep_dir / str(job) / "summary.json").write_text(json.dumps(summary))
            job += 1


def test_each_setting_gets_its_own_best_lr_and_tuned_csv_says_which(tmp_path):
    hand_built_sweep(tmp_path)
    write_report(tmp_path)  # the sweep varies optim.lr: tuned without asking
    with (tmp_path / "tuned.csv").open() as f:
        reader = csv.DictReader(f)
        rows = {row["setting"]: row for row in reader}
    assert reader.fieldnames == ["setting", "lr", "n", "val_loss_mean", "test_loss_mean", "test_loss_ci_low",
                                 "test_loss_ci_high", "lora.rank"]
    assert {row["lora.rank"]: float(row["lr"]) for row in rows.values()} == {str(r): lr for r, lr in CHOSEN.items()}
    r4 = rows["lora.rank=4"]
    assert float(r4["val_loss_mean"]) == pytest.approx(2.00) and r4["n"] == "3"
    expected = stats.estimate(TEST[4])
    assert float(r4["test_loss_mean"]) == pytest.approx(1.92)
    assert (float(r4["test_loss_ci_low"]), float(r4["test_loss_ci_high"])) == pytest.approx(expected.ci)


def test_the_report_warns_at_the_edge_and_for_one_lr_and_adjusts_every_pair(tmp_path):
    hand_built_sweep(tmp_path)
    write_report(tmp_path)
    section = (tmp_path / "report.md").read_text().split("## Settings at their own best optim.lr")[1]
    table = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines() if line.startswith("| lora")}
    assert "at the edge of the grid (its largest lr)" in table["lora.rank=8"]
    assert "one lr: not tuned" in table["lora.rank=32"]
    assert "edge" not in table["lora.rank=4"] and "edge" not in table["lora.rank=16"]  # the tie went inward
    pairs = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(pairs) == 6
    # r4 − r16 at their chosen lrs: per-seed test differences -0.01, -0.03, +0.01: within the noise
    r4_r16 = next(line for line in pairs if line.startswith("- lora.rank=4 − lora.rank=16: -0.0100"))
    assert "not shown at 3 seeds, |diff| < " in r4_r16 and "the same" not in section
    assert (tmp_path / "val_loss_vs_lr.png").is_file() and (tmp_path / "learning_vs_forgetting.png").is_file()


def test_tune_a_key_the_sweep_does_not_vary_gives_one_lr_each(tmp_path):
    from loralab.report import main

    for job, rank in enumerate((4, 8)):
        overrides = [f"lora.rank={rank}"]
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(f"- lora.rank={rank}\n")
        (tmp_path / str(job) / "summary.json").write_text(json.dumps({
            "overrides": overrides, "status": "completed", "error": None,
            "metrics": {"val/loss": 2.0, "best/val_loss": 2.0, "gain/val_loss": 0.1, "test/loss": 2.1,
                        "params/trainable": 100 * rank}, "config": {"seed": 1, "lora": {"rank": rank}}}))
    main([str(tmp_path), "--tune", "optim.lr"])
    rows = list(csv.DictReader((tmp_path / "tuned.csv").open()))
    assert [(row["setting"], row["lr"], row["n"]) for row in rows] == [("lora.rank=4", "", "1"),
                                                                       ("lora.rank=8", "", "1")]
    assert "one lr: not tuned" in (tmp_path / "report.md").read_text()
