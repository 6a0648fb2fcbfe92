"""Files loralab did not just write are never unpickled: a checkpoint planted in a run
directory or in the shared cache of pretrained bases cannot run code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loralab.base import read_base_metadata
from loralab.checkpoints import CheckpointError, checkpoint_step

from conftest import TINY, run_train


class Payload:
    """Unpickling this creates ``marker``: the proof that a load ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def plant(path: Path, marker: Path) -> Path:
    """A file that looks like a Lightning checkpoint and runs code when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 6, "state_dict": {}, "payload": Payload(marker)}, path)
    return path


def test_reading_a_planted_checkpoints_step_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = plant(tmp_path / "last.ckpt", marker)
    with pytest.raises(CheckpointError, match="last.ckpt cannot be resumed from"):
        checkpoint_step(checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated"])
def test_a_damaged_checkpoint_is_one_error_naming_it(tmp_path, content):
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{checkpoint} cannot be resumed from.*delete it"):
        checkpoint_step(checkpoint)


@pytest.mark.slow
def test_resuming_from_a_planted_checkpoint_refuses_in_one_line(tmp_path, base_cache):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    checkpoint = plant(run_dir / "checkpoints" / "last.ckpt", marker)
    result = run_train([*TINY, "logger=none", f"paths.cache_dir={base_cache}", f"hydra.run.dir={run_dir}",
                        "resume=true"], cwd=tmp_path, check=False)
    assert not marker.exists()
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert result.stderr.startswith(f"{checkpoint} cannot be resumed from")


@pytest.mark.slow
def test_a_planted_pretraining_checkpoint_in_the_cache_is_discarded(tmp_path):
    """A plain run, no flag: the cache's pretraining resumes by itself, so a file planted in a
    shared cache is the more dangerous one. It is named, removed, and the pretraining starts over."""
    cache, marker = tmp_path / "cache", tmp_path / "pwned"
    args = [*TINY, "logger=none", f"paths.cache_dir={cache}"]
    run_train([*args, f"hydra.run.dir={tmp_path / 'first'}"], cwd=tmp_path)
    (base,) = cache.glob("base-*.safetensors")
    expected = read_base_metadata(base)["sha256"]
    base.unlink()
    checkpoint = plant(base.with_suffix(".ckpt-dir") / "last.ckpt", marker)
    result = run_train([*args, f"hydra.run.dir={tmp_path / 'second'}"], cwd=tmp_path)
    assert not marker.exists()
    assert f"{checkpoint} cannot be resumed from" in result.stdout + result.stderr
    assert read_base_metadata(base)["sha256"] == expected  # pretrained again from the start: the same weights
