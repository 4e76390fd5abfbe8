"""Pending saves finish when the interpreter exits: every open `Checkpointer` is closed.

exit_hook.register(ckpt)   # in Checkpointer.__init__
exit_hook.forget(ckpt)     # in Checkpointer.close
"""

import atexit

# Importing the executor registers concurrent.futures' exit hook before ours (see below).
import concurrent.futures  # noqa: F401
import threading
import weakref

_OPEN: weakref.WeakSet = weakref.WeakSet()


def register(checkpointer) -> None:
    """Closes `checkpointer` at exit unless it was closed before (`forget`)."""
    _OPEN.add(checkpointer)


def forget(checkpointer) -> None:
    _OPEN.discard(checkpointer)


def _close_open_checkpointers() -> None:
    for checkpointer in list(_OPEN):
        checkpointer.close()


# Orbax finishes async saves on concurrent.futures threads, and concurrent.futures refuses new
# work once the interpreter starts shutting down threads, which happens *before* ordinary
# `atexit` hooks run: an atexit hook is too late and the save is lost. Hooks registered with
# `threading._register_atexit` run at that earlier point, last registered first, so this one
# (registered after concurrent.futures') runs while the executors still accept work.
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_close_open_checkpointers)
else:  # pragma: no cover - other Python implementations
    atexit.register(_close_open_checkpointers)
