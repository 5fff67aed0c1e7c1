"""CPU parallelism: one thread per cell (reproducible numbers), cells side by side on the free CPUs.

The last digits of a CPU run depend on torch's intra-op thread count (reductions are split per
thread), so a cell's thread count is part of what makes it reproducible: it is a fixed setting
(``runtime.threads``, default 1), never derived from the machine's load. What adapts to the machine is
how many cells run side by side (``parallel_cells``): the CPUs this process may use, minus those
other processes keep busy right now. Threads that do run (``runtime.threads`` > 1) wait passively
(``OMP_WAIT_POLICY=PASSIVE``, set in ``fl_core/__init__.py`` before torch loads, unless the user set
it): spinning OpenMP threads collapse throughput when another process shares the cores.
"""
from __future__ import annotations

import os
import sys
import time


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies over all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as fh:
            fields = [float(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cpus(interval: float = 0.3) -> float:
    """How many CPUs (of the machine) were busy over the last ``interval`` seconds; 0 where unknown."""
    first = _cpu_times()
    if first is None:
        return 0.0
    time.sleep(interval)
    second = _cpu_times()
    busy, total = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * busy / total if total > 0 else 0.0


def parallel_cells(cells: int, threads_per_cell: int = 1, busy: float | None = None) -> int:
    """How many cells to run side by side: the usable CPUs not busy elsewhere, over each cell's threads,
    at most ``cells``; at least 1, with a warning when the machine is already fully busy."""
    usable = usable_cpus()
    busy = busy_cpus() if busy is None else busy
    free = int(usable - busy + 0.5)  # a CPU more than half free counts
    if free < threads_per_cell:
        print(f"warning: {busy:.1f} of the {usable} usable CPU(s) are busy with other work; running one cell "
              "at a time, which will be slower than on a quiet machine", file=sys.stderr)
    return max(1, min(cells, free // max(1, threads_per_cell)))
