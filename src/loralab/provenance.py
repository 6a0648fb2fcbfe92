"""Where a result came from: the code (git commit, and whether the tree had uncommitted
changes), the package versions, the machine and the device. Recorded in summary.json
(``provenance``) and in the W&B config (``provenance.*``), so a number can be traced to
what produced it."""

from __future__ import annotations

import platform
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from loralab.hardware import device_kind, device_name

PACKAGES = ("torch", "pytorch-lightning", "hydra-core", "omegaconf", "wandb", "loralab")
GIT_TIMEOUT_S = 5


def provenance(trainer_cfg) -> dict:
    commit, dirty = git_state(Path(__file__).resolve().parent)
    return {"git_commit": commit, "git_dirty": dirty,
            "versions": {"python": platform.python_version(), **{name: package_version(name) for name in PACKAGES}},
            "machine": {"platform": platform.platform(), "hostname": socket.gethostname()},
            "device": device_name(device_kind(str(trainer_cfg.get("accelerator", "auto"))))}


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_state(directory: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding ``directory`` — loralab's own source, tracked
    there — or (None, None) when it is not one (an installed wheel, no git)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                                  timeout=GIT_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # a site-packages inside some other repository's tree is not loralab's checkout
    if git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None, None
    status = git("status", "--porcelain")
    return git("rev-parse", "HEAD"), None if status is None else bool(status)
