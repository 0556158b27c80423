"""How many threads ouvert's matrix products run on.

torch starts with one thread per physical core of the machine, whatever share of it the process
may use: in a container limited to 2 of 64 cores it runs 32 threads that take turns on 2 cores,
and every parallel region waits for the slowest. `configure_threads` (called by the `ouvert`
command before any work) lowers the count to the cores the process may use (its CPU affinity and,
under cgroup v2, its CPU quota), unless the user chose one: `--threads N`, OMP_NUM_THREADS /
MKL_NUM_THREADS, or a count already set with torch.set_num_threads that fits those cores.
On a machine busy with other work it also says, in one line, what may help.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import TextIO

import torch

# A load average this many times the usable cores means our threads will wait for the CPU.
BUSY_FACTOR = 1.5


def cgroup_cpu_limit(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """CPUs allowed by a cgroup v2 quota ("200000 100000" -> 2), None when unlimited or unknown."""
    try:
        quota, period = open(path).read().split()[:2]
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2, or "max" (no quota)
        return None


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return min(n, limit) if limit else n


def choose_threads(requested: int | None, env: Mapping[str, str], current: int, usable: int) -> int | None:
    """The thread count to set, or None to leave torch's as it is.

    requested: --threads. current: torch.get_num_threads(), torch's default (one per physical core,
    hyper-threads not counted) or what the program set. A count at or below the usable cores is
    kept: either the user chose it or it is torch's physical-core count, which beats one thread per
    hyper-thread for matrix products."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, not {requested}")
        return requested
    if env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS"):
        return None  # torch read it at start-up
    return usable if current > usable else None


def busy_hint(load: float, usable: int, threads: int, env: Mapping[str, str]) -> str | None:
    """One line of advice when the load average is well above the usable cores, else None."""
    if load <= BUSY_FACTOR * usable:
        return None
    tips = []
    if env.get("OMP_WAIT_POLICY", "").lower() != "passive":
        tips.append("OMP_WAIT_POLICY=PASSIVE (threads sleep instead of spinning while they wait)")
    if threads > 1:
        tips.append(f"fewer threads (--threads N, now {threads})")
    if not tips:
        return None
    return (f"ouvert: the machine is busy (load average {load:.1f} on {usable} usable core(s)); "
            f"{' or '.join(tips)} may help")


def configure_threads(
    requested: int | None = None,
    *,
    warn: bool = True,
    env: Mapping[str, str] | None = None,
    usable: int | None = None,
    load: Callable[[], float] | None = None,
    set_threads: Callable[[int], None] = torch.set_num_threads,
    out: TextIO | None = None,
) -> int:
    """Set torch's thread count as choose_threads says and, when warn, print busy_hint's line;
    returns the count in effect. env, usable, load, set_threads and out are for tests."""
    env = os.environ if env is None else env
    usable = usable_cpus() if usable is None else usable
    n = choose_threads(requested, env, torch.get_num_threads(), usable)
    if n is not None:
        set_threads(n)
    threads = n if n is not None else torch.get_num_threads()
    if not warn:
        return threads
    try:
        load_now = load() if load is not None else os.getloadavg()[0]
    except (AttributeError, OSError):  # no getloadavg on Windows; it fails where /proc/loadavg is unreadable
        return threads
    hint = busy_hint(load_now, usable, threads, env)
    if hint:
        print(hint, file=out or sys.stderr)
    return threads
