"""Peak memory of a stretch of work, on its own: the CUDA allocator's peak, or on Linux the
process's resident-set high-water mark (``VmHWM``). Both can be reset, which matters because a
multirun's jobs share one process: without a reset each job's peak would include the jobs
before it. Elsewhere (macOS) the CPU peak is the whole process's (``ru_maxrss``).
"""

from __future__ import annotations

import ctypes
import resource
import sys
from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")


def resident_mb() -> tuple[float, float]:
    """(current, high-water mark) resident set of this process in MiB (Linux /proc)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def can_reset_cpu_peak() -> bool:
    return sys.platform == "linux" and CLEAR_REFS.exists()


def reset_peak_memory(device: torch.device) -> None:
    """Forget the peak so far: the allocator's on CUDA; on Linux, hand freed heap back to the
    OS (glibc keeps it otherwise) and reset the kernel's high-water mark (clear_refs 5)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif can_reset_cpu_peak():
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        CLEAR_REFS.write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """The peak since the last reset_peak_memory, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if can_reset_cpu_peak():
        return resident_mb()[1]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # macOS reports bytes


def current_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return resident_mb()[0]


def available_memory_mb(device: torch.device) -> float | None:
    """Memory free for new work now: the GPU's free memory, or Linux's MemAvailable; None elsewhere."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return None
    fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines())
    return int(fields["MemAvailable"].split()[0]) / 1024
