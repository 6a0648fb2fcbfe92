"""python -m loralab.evaluate: one base, every adapter of a sweep, on equal terms."""

import subprocess
import sys

import pytest
import torch

from loralab.adapters import load_adapter
from loralab.base import load_recorded_base
from loralab.evaluate import BASE, evaluate_sweep

from conftest import read_summary

pytestmark = pytest.mark.slow  # needs a real sweep


def test_each_adapter_reproduces_its_own_run_on_the_shared_base(rank_sweep):
    sweep_dir, _ = rank_sweep
    rows = evaluate_sweep(sweep_dir, [], prompt="def ", max_new_tokens=12)
    lora_jobs = sorted((d for d in sweep_dir.iterdir() if (d / "adapter").is_dir()), key=lambda d: int(d.name))
    assert [row["run"] for row in rows] == [BASE, *(read_summary(d)["name"] for d in lora_jobs)]
    base_loss = read_summary(lora_jobs[0])["metrics"]["base/val_loss"]
    assert rows[0]["val/loss"] == pytest.approx(base_loss, abs=1e-5)  # adapters disabled: the base
    for row, job in zip(rows[1:], lora_jobs):
        s = read_summary(job)
        assert row["val/loss"] == pytest.approx(s["metrics"]["val/loss"], abs=1e-5)
        assert row["val/tokens"] == s["metrics"]["val/tokens"]
        # the generation of a base that holds this adapter alone
        alone = load_recorded_base(s["base"])
        load_adapter(alone, job / "adapter")
        from loralab.data import ByteTokenizer

        idx = torch.tensor([ByteTokenizer().encode("def ")])
        expected = ByteTokenizer().decode(alone.eval().generate(idx, 12, temperature=0)[0, idx.size(1):].tolist())
        assert row["generation"] == expected


def test_cli_writes_the_table(rank_sweep):
    sweep_dir, _ = rank_sweep
    result = subprocess.run([sys.executable, "-m", "loralab.evaluate", str(sweep_dir)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (sweep_dir / "evaluation.md").read_text().count("\n| ") == 6  # the header, the base, 4 adapters
    assert BASE in result.stdout


def test_cli_names_a_directory_without_adapters(tmp_path):
    result = subprocess.run([sys.executable, "-m", "loralab.evaluate", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode != 0 and "holds no completed LoRA run" in result.stderr
