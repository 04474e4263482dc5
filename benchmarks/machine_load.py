"""
The machine's load, as the benchmarks record it beside their timings (Linux /proc/stat). The library never reads it:
its results and its speed settings depend only on what it is given.
"""
import os
import time


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine so far, all its CPUs (Linux /proc/stat; idle and iowait are
    not busy), or None where /proc/stat cannot be read."""
    try:
        with open('/proc/stat') as f:
            jiffies = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf('SC_CLK_TCK')
    return (sum(jiffies) - jiffies[3] - jiffies[4]) / tick, sum(jiffies) / tick


def cpu_busy_fraction(seconds: float = 2.0) -> float:
    """The fraction of the machine's CPU time that was busy over the next `seconds` (0 where /proc/stat cannot be
    read)."""
    start = machine_cpu_seconds()
    time.sleep(seconds)
    end = machine_cpu_seconds()
    if start is None or end is None:
        return 0.0
    return (end[0] - start[0]) / max(1e-9, end[1] - start[1])
