"""CPU threads: how many the BLAS library and torch's intra-op pool may use while the fast path runs.

The factorization is a mix of many small operations (the discrete step visits thousands of positions per sweep,
each a few dozen operations on arrays of a few hundred numbers) and some large products (``X @ (B H Bᵀ)`` in the core
step, the losses). Threads only help the large products, and a BLAS library that starts more threads than there
are free cores loses badly: measured in issue 9, ``armor-ref demo`` took 62 s with OpenBLAS's default threading on
a busy 2-core machine and 17 s with one thread. So the count is chosen deliberately (:func:`default_threads`) and
applied to both pools for the duration of a call (:func:`limit_threads`); ``--threads`` overrides it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_open: list[int] = []  # the thread counts of the limit_threads blocks now open, innermost last


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads() -> int:
    """The thread count used when none is given: the cores this process may use, minus those the 1-minute load
    average says are busy, shared among the processes ``torchrun`` started on this machine; at least 1 (so a busy
    machine gets one thread per process, which is never badly oversubscribed)."""
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):
        busy = 0
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, (available_cores() - busy) // processes)


def current_limit() -> int | None:
    """The thread count of the innermost open :func:`limit_threads` block; ``None`` outside any."""
    return _open[-1] if _open else None


@contextmanager
def limit_threads(threads: int | None = None) -> Iterator[int]:
    """Run the block with ``threads`` BLAS threads (NumPy/SciPy's OpenBLAS or MKL, through threadpoolctl) and
    ``threads`` torch intra-op threads (when torch is already imported). ``None``: the count of the enclosing block
    if there is one (applied again, for a library imported since), else :func:`default_threads`. The previous
    settings come back afterwards. Yields the count used."""
    if threads is None:
        threads = current_limit() or default_threads()
    if threads < 1:
        raise ValueError(f"thread count must be at least 1, not {threads}")
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    previous_torch = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=threads, user_api="blas"):
        if torch is not None:
            torch.set_num_threads(threads)
        _open.append(threads)
        try:
            yield threads
        finally:
            _open.pop()
            if torch is not None:
                torch.set_num_threads(previous_torch)
