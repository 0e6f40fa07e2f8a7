"""How long the engine's idle OpenMP threads spin before they sleep, set before torch loads.

torch's CPU wheels and rung's native kernels share one OpenMP runtime, GNU libgomp. Its idle
threads poll for new work GOMP_SPINCOUNT times (300,000 by default: milliseconds) before they
sleep. That suits a process whose only work is the parallel regions. A server is not such a
process: between two engine steps (the scheduler, the sampler, the detokenizer: milliseconds of
Python on one thread) and while waiting for the GIL, the team's other threads keep polling, on
the cores that the event loop (HTTP, SSE), the prepare threads and, often, the clients on the
same host need. Those then run in the middle of the next step, preempting one of its threads,
and the step waits for it at its next barrier. A short spin (a few microseconds) still catches
the barriers inside a step, and lets the cores go between steps.

libgomp reads its environment once, when it is loaded (with torch), so ``apply`` must run before
the first ``import torch``; a value the user already set is kept. Other OpenMP runtimes (LLVM's
libomp, Intel's) ignore GOMP_SPINCOUNT.
"""

from __future__ import annotations

import os
import sys

# polls before an idle thread sleeps (libgomp's default: 300000)
SPIN_COUNT = "10000"


def apply(environ=None) -> bool:
    """Set the server's OpenMP spin count in ``environ`` (os.environ) unless the user set one.
    False when it is too late: torch (and libgomp) is already loaded in this process, as when a
    test or a notebook starts the server; then nothing is changed."""
    if environ is None:
        if "torch" in sys.modules:
            return False
        environ = os.environ
    environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
    return True
