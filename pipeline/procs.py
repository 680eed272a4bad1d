"""Child processes that end with their parent: a parent-death signal, set from inside the child."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Loaded here, in the parent: a preexec_fn runs between fork and exec, where loading a library is not safe.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies; True where that was set.

    Call it first thing in a child (a `preexec_fn`, a pool initializer). Linux only: elsewhere it does nothing,
    and a child outlives a SIGKILLed parent as before. The signal follows the parent *thread* that forked the child,
    so the process that spawns long-lived workers should do it from its main thread.
    """
    if not sys.platform.startswith("linux"):
        return False
    if _LIBC.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    # The parent may have died between fork and prctl: then nobody will send the signal.
    if os.getppid() == 1:
        os.kill(os.getpid(), sig)
    return True
