"""python -m loralab.evaluate: one base, every adapter of a sweep, on equal terms."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from loralab.adapters import load_adapter
from loralab.base import load_recorded_base
from loralab.evaluate import BASE, evaluate_sweep

from conftest import read_summary, user_env

pytestmark = pytest.mark.slow  # needs a real sweep


def test_each_adapter_reproduces_its_own_run_on_the_shared_base(rank_sweep):
    sweep_dir, _ = rank_sweep
    rows, left_out = evaluate_sweep(sweep_dir, [], prompt="def ", max_new_tokens=12)
    lora_jobs = sorted((d for d in sweep_dir.iterdir() if (d / "adapter").is_dir()), key=lambda d: int(d.name))
    assert [row["run"] for row in rows] == [BASE, *(read_summary(d)["name"] for d in lora_jobs)]
    full = sorted((d for d in sweep_dir.iterdir() if (d / "summary.json").is_file() and d not in lora_jobs),
                  key=lambda d: int(d.name))
    assert len(full) == 2 and left_out == [f"Job {d.name} left out: it saved no adapter/ (full fine-tuning, or a "
                                           "run that did not finish)." for d in full]
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
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {tmp_path} holds no readable adapter of a completed run")


def test_cli_lists_every_job_it_leaves_out_and_why(rank_sweep, tmp_path):
    """One LoRA job's summary cut off mid-write, one's adapter truncated, one's adapter config not
    JSON: each left out with why, in evaluation.md and on stderr; the fourth is evaluated."""
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(rank_sweep[0], sweep_dir)
    lora_jobs = sorted((d for d in sweep_dir.iterdir() if (d / "adapter").is_dir()), key=lambda d: int(d.name))
    cut, truncated, not_json, intact = lora_jobs
    (cut / "summary.json").write_text('{"status": "compl')
    (truncated / "adapter" / "adapter.safetensors").write_bytes(b"\x10\x00")
    (not_json / "adapter" / "adapter_config.json").write_text('{"lora": {"rank": 2')
    result = subprocess.run([sys.executable, "-m", "loralab.evaluate", str(sweep_dir)], capture_output=True,
                            text=True, env=user_env())
    assert result.returncode == 0, result.stderr
    whys = {cut: "its summary is unreadable", truncated: "its adapter cannot be read (adapter ",
            not_json: "its adapter cannot be read ("}
    report = (sweep_dir / "evaluation.md").read_text()
    for job_dir, why in whys.items():
        line = f"Job {job_dir.name} left out: {why}"
        assert line in result.stderr and line in report
    assert len([line for line in result.stderr.splitlines() if " left out: " in line]) == 5  # and the 2 full ones
    assert [row.split(" | ")[1] for row in report.splitlines() if row.startswith("| ")][1:] == ["", intact.name]


def finished_lora_job(job_dir: Path, kind: str, modules_to_save: list[str]) -> None:
    """What a completed LoRA run leaves for loralab.evaluate: its summary, config and adapter config."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 1, "model": {"kind": kind}}))
    (job_dir / "summary.json").write_text(json.dumps({"status": "completed", "name": "lora.rank=1"}))
    (job_dir / "adapter").mkdir()
    (job_dir / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"lora": {"rank": 1, "modules_to_save": modules_to_save}, "base": {"source": "cache", "sha256": "0" * 64}}))


@pytest.mark.parametrize("kind, modules_to_save, message", [
    ("vit", ["head"], "the sweep's runs are model.kind=vit: loralab.evaluate compares GPT adapters only"),
    ("gpt", ["lm_head"], "run 'lora.rank=1' trained modules_to_save=['lm_head'] in full beside its adapter"),
])
def test_evaluate_refuses_adapters_it_cannot_put_side_by_side_before_loading_any(tmp_path, kind, modules_to_save,
                                                                                 message):
    finished_lora_job(tmp_path / "0", kind, modules_to_save)
    result = subprocess.run([sys.executable, "-m", "loralab.evaluate", str(tmp_path)], capture_output=True,
                            text=True, env=user_env())
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and not (tmp_path / "evaluation.md").exists()
