"""One line per cause: a warning that a run raises many times (the Fréchet distance's rank-deficiency note, once per
interval subset and per prompt) is printed the first time and counted after, and the run ends with one line per
repeated cause saying how often it happened.

A *cause* is the logger plus the message template (``record.msg`` before its ``%`` arguments), so "fewer samples
than feature dimensions (32 …)" and "(64 …)" are one cause. Only WARNING records are folded: errors always print,
and INFO lines are progress. The filter sits on the root logger's handlers (where Hydra's console and file handlers
are) for the duration of one run, so a sweep's jobs each get their own first line and count.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

__all__ = ["RepeatedWarnings", "once_per_cause"]

log = logging.getLogger(__name__)


class RepeatedWarnings(logging.Filter):
    """A handler filter passing the first WARNING of each cause and counting the rest (``counts``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[tuple[str, str], list] = {}  # cause -> [times seen, first message]
        self._last: tuple[logging.LogRecord | None, bool] = (None, True)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        if record is self._last[0]:  # the same record at the next handler (console, then file): same fate
            return self._last[1]
        cause = (record.name, str(record.msg))
        seen = self.counts.get(cause)
        if seen is None:
            self.counts[cause] = [1, record.getMessage()]
        else:
            seen[0] += 1
        self._last = (record, seen is None)
        return seen is None

    def repeated(self) -> list[tuple[int, str]]:
        """``(times, first message)`` of every cause seen more than once, most frequent first."""
        return sorted(((n, first) for n, first in self.counts.values() if n > 1), key=lambda x: -x[0])


@contextlib.contextmanager
def once_per_cause(logger: logging.Logger | None = None) -> Iterator[RepeatedWarnings]:
    """Fold repeated warnings on ``logger``'s handlers (default: the root logger's) while the block runs, then log
    one line per repeated cause with its count."""
    logger = logger or logging.getLogger()
    handlers = list(logger.handlers)
    folding = RepeatedWarnings()
    for handler in handlers:
        handler.addFilter(folding)
    try:
        yield folding
    finally:
        for handler in handlers:
            handler.removeFilter(folding)
        for times, first in folding.repeated():
            text = first if len(first) <= 160 else first[:157] + "..."
            log.warning("%d× in this run (printed once above): %s", times, text)
