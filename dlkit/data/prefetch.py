"""Background prefetching: prepare the next batches (e.g. host-to-device copies) while the
current step runs.

Usage::

    import jax
    import dlkit.data as data

    train = data.Loader(data.load_dataset("digits", "train"), 32, position=start)
    with data.Prefetcher(train, put=jax.device_put, size=2) as batches:
        for step, batch in zip(range(start, num_steps), batches):
            state = train_step(state, batch)
            # Save start + batches consumed, NOT train.position: the background thread has
            # already pulled up to `size` (+1 in flight) batches ahead.
            checkpoint = {"loader": {"position": step + 1}}

Note that ``dlkit.data.prefetch`` is the function :func:`prefetch` (the package re-exports
it under the module's name); reach this module's contents through ``dlkit.data``.

This module never imports jax: the device transfer is whatever ``put`` does.
"""

import queue
import threading

# How often a blocked producer re-checks the stop flag, in seconds.
_POLL_S = 0.05

_END = object()


class _Raised:
    """Carries an exception from the producer thread to the consumer."""

    def __init__(self, error):
        self.error = error


def _offer(q, stop, value):
    """Puts value on q unless stop is set; returns False when stopped."""
    while not stop.is_set():
        try:
            q.put(value, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _produce(iterator, put, q, stop):
    """Producer thread body: fills q with put(item), then _END or _Raised."""
    while not stop.is_set():
        try:
            value = put(next(iterator))
        except StopIteration:
            _offer(q, stop, _END)
            return
        except BaseException as error:  # noqa: BLE001 - forwarded to the consumer
            _offer(q, stop, _Raised(error))
            return
        if not _offer(q, stop, value):
            return


class Prefetcher:
    """Iterator yielding ``put(item)`` for each item of ``iterator``, computed ahead.

    One daemon thread calls ``put(next(iterator))`` and keeps up to ``size`` results ready in
    a ``queue.Queue(maxsize=size)``. Items come out exactly in order. An exception raised by
    the iterator or by ``put`` is re-raised by ``__next__`` at the point its item would have
    been yielded; exhaustion of ``iterator`` ends iteration normally.

    Position bookkeeping: the thread advances ``iterator`` ahead of the consumer, so for a
    :class:`dlkit.data.loader.Loader` ``loader.position`` is ahead of what was trained on.
    Checkpoint ``start_position + batches_consumed`` instead.

    Args:
        iterator: any iterator (it is only ever advanced from one thread).
        put: callable applied to each item, e.g. ``jax.device_put`` or a sharding function.
        size: number of results kept ready, a non-negative int; 0 means no thread: each
            ``__next__`` calls ``put(next(iterator))`` synchronously.
    """

    def __init__(self, iterator, put, size=2):
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size: expected a non-negative int, got {size!r}")
        if not callable(put):
            raise ValueError(f"put: expected a callable, got {type(put).__name__}")
        self._iterator = iter(iterator)
        self._put = put
        self._size = size
        self._done = False
        self._stop = threading.Event()
        self._queue = None
        self._thread = None
        if size > 0:
            self._queue = queue.Queue(maxsize=size)
            # The thread gets no reference to self, so an abandoned Prefetcher can be
            # garbage collected and its __del__ stops the thread.
            self._thread = threading.Thread(
                target=_produce,
                args=(self._iterator, put, self._queue, self._stop),
                name="dlkit-prefetch",
                daemon=True,
            )
            self._thread.start()

    @property
    def thread(self):
        """The producer ``threading.Thread``, or None when ``size == 0``."""
        return self._thread

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        if self._thread is None:
            try:
                return self._put(next(self._iterator))
            except StopIteration:
                self._done = True
                raise
        while True:
            try:
                value = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                # A closed prefetcher (or a producer that died silently) must not hang.
                if self._stop.is_set() or not self._thread.is_alive():
                    if self._queue.empty():
                        self._done = True
                        raise StopIteration from None
        if value is _END:
            self._done = True
            raise StopIteration
        if isinstance(value, _Raised):
            self._done = True
            raise value.error
        return value

    def close(self, timeout=1.0):
        """Stops the producer thread and drops prepared results; idempotent.

        Args:
            timeout: seconds to wait for the thread to exit. A thread stuck inside
                ``next(iterator)`` or ``put`` exits when that call returns (it is a daemon).
        """
        self._done = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            # Free the device buffers held by results nobody will consume.
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    def __del__(self):
        # getattr: __init__ may have raised before _stop existed.
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


def prefetch(iterator, put, size=2):
    """Returns a :class:`Prefetcher` yielding ``put(item)`` for each item of ``iterator``.

    Args:
        iterator: any iterator, e.g. a :class:`dlkit.data.loader.Loader`.
        put: callable applied to each item in the background thread (e.g. ``jax.device_put``).
        size: results kept ready (non-negative int); 0 runs ``put(next(iterator))``
            synchronously without a thread.

    Returns:
        Prefetcher: an iterator with ``close()`` and context-manager support. Its items are
        exactly ``put(item)`` in order. Save ``start_position + batches_consumed`` in
        checkpoints, not ``loader.position``, which has run ahead of the consumer.
    """
    return Prefetcher(iterator, put, size)
