"""Ctrl-C and SIGTERM: one place that decides what they do to a long computation.

Two behaviours, both restoring the previous handlers on the way out:

* ``stop_on_signals(loop, say)``: a training loop finishes its current step, saves and stops
  (``loop.request_stop(signum)``); a second signal aborts at once (KeyboardInterrupt) — every
  save is atomic, so the last one stays intact. The CVAE, prior and classifier trainers.
* ``interrupt_on_signals()``: raise ``Interrupted(signum)`` at once, for work between training
  loops (a sweep's evaluations); a trainer running inside installs its own handler on top.

The exit codes are the shell's: 130 for SIGINT, 143 for SIGTERM.
"""

import contextlib
import signal
import threading

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum):
    """The exit code for a run stopped by signal `signum` (130 when it was no signal)."""
    return EXIT_SIGNAL.get(signum, 130)


def signal_name(signum):
    return signal.Signals(signum).name if signum in EXIT_SIGNAL else "stop"


class Interrupted(BaseException):
    """SIGINT/SIGTERM outside a training loop: stop now (a BaseException, so that no
    `except Exception` on the way swallows it)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _handled(handler):
    # Signal handlers can only be installed from the main thread; elsewhere (a test's worker
    # thread) the computation runs without them.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, handler) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def stop_on_signals(loop, say):
    """Inside, SIGINT and SIGTERM call loop.request_stop(signum) and say what happens; a second
    signal, once loop.stop_signal is set, raises KeyboardInterrupt."""

    def handler(signum, frame):
        if loop.stop_signal is not None:
            raise KeyboardInterrupt
        loop.request_stop(signum)
        say(f"{signal.Signals(signum).name}: finishing the current step and saving a checkpoint "
            f"(send it again to abort without saving)")

    return _handled(handler)


def interrupt_on_signals():
    """Inside, SIGINT and SIGTERM raise Interrupted(signum) at once."""

    def handler(signum, frame):
        raise Interrupted(signum)

    return _handled(handler)
