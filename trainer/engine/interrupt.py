"""SIGINT / SIGTERM during training: finish the optimizer step, write `last.pt`, exit non-zero.

SLURM sends SIGTERM before preemption; Ctrl-C sends SIGINT. The first signal only
sets a flag that the loop reads after each optimizer step (every rank's flag is
part of the step's status exchange, so all ranks stop at the same step); a second
SIGINT raises KeyboardInterrupt at once (a second SIGTERM ends the process).
Handlers are installed only in the main thread and restored on exit.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager that turns the first SIGINT/SIGTERM into `requested` / `signal_name`."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second signal: abort now
            signal.signal(signum, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if self.enabled:
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()
