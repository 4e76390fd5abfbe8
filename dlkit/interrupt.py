"""Stop requests: SIGTERM, SIGINT and Ctrl-C (also in a notebook) end a run cleanly.

    with interrupt.StopRequests() as stop:
        for step in ...:
            train()
            if stop.requested(step):     # after the step: save, wait, return
                break

The first signal only sets a flag: the loop finishes the step in flight, writes a checkpoint,
waits for it, and returns (the CLI then exits 0). A second SIGINT raises KeyboardInterrupt at
once, the usual escape hatch. Handlers are installed only in the main thread (where Python
delivers signals) and the previous ones are restored on exit.

With several processes, a signal reaches each at a different step; JAX's preemption sync point
(`multihost_utils.reached_preemption_sync_point`) makes every process agree on the same step,
so all of them save together.
"""

import signal
import threading

import jax


class StopRequests:
    """Context manager that turns SIGTERM/SIGINT into a polite stop request."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, step: int) -> bool:
        """True when the run should stop after `step` (same answer on every process)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.signal_name = self.signal_name or "preemption"
                    return True
            except RuntimeError:
                pass  # no preemption service in this runtime: local signals only
            return False
        return self.signal_name is not None
