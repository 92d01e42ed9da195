"""How many CPU threads a command computes with: by default one per idle core this process may use.

torch's own default is the machine's physical cores, which is more than a process may use under a
CPU affinity mask (a container, a batch scheduler, ``taskset``), and threads beyond the cores it
gets only wait for each other: on 2 cores under a load of 6, a small train-student epoch took 4.5 s
with one thread and 31 s with two (docs/benchmarks.md, "Threads on a busy CPU"). So the default
is the usable cores times the share of the machine that is idle (from the load average), at least
one. ``OMP_NUM_THREADS``, when set, is left as it is, as torch leaves it.
"""

from __future__ import annotations

import contextlib
import os

from kdcache.errors import ConfigError


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform (macOS, Windows)
        return os.cpu_count() or 1


def idle_share() -> float:
    """The share of the machine's CPUs not busy over the last minute (1.0 where there is no load average)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 1.0
    return max(0.0, 1.0 - load / (os.cpu_count() or 1))


def default_threads() -> int:
    """The usable cores that are idle, shared among the ranks torchrun started on this machine; at least one."""
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = max(1, usable_cores() // local_ranks)
    return max(1, min(cores, round(cores * idle_share())))


#: Why the current thread count was chosen, while :func:`cpu_threads` holds it (for :func:`thread_note`).
_why: str | None = None


def thread_note() -> str:
    """How many CPU threads this process computes with, and why: for a command's opening line."""
    import torch

    note = f"{torch.get_num_threads()} CPU thread(s) of the {usable_cores()} core(s) this process may use"
    return f"{note}: {_why}" if _why else note


@contextlib.contextmanager
def cpu_threads(threads: int | None = None):
    """Run with ``threads`` intra-op threads (None: :func:`default_threads`, or ``OMP_NUM_THREADS`` when set),
    and restore torch's setting afterwards; the command says how many (:func:`thread_note`) once it starts."""
    global _why
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"--threads {threads}; expected a positive number of CPU threads")
    import torch  # deferred: the CLI imports this module before it knows the command

    before = torch.get_num_threads()
    if threads is not None:
        count, why = threads, "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        count, why = before, "OMP_NUM_THREADS"
    else:
        count = default_threads()
        why = f"{100 * idle_share():.0f}% of the machine idle; --threads N to choose"
    torch.set_num_threads(count)
    _why, outer = why, _why
    try:
        yield count
    finally:
        torch.set_num_threads(before)
        _why = outer
