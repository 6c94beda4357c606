"""A progress display: tqdm when it is installed, else a short status line on stderr every few seconds."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """``update(n)`` / ``set_postfix(text)`` / ``close()`` over ``total`` items (``None``: unknown).

    The rate shown is records/s; :func:`~rankloss.chains.make_chains_file` adds edits/s, fallbacks and
    (served engine) request retries as the postfix.

    Args:
        total: the number of items, if known.
        desc: a label.
        enabled: ``False`` shows nothing.
        interval: seconds between status lines when tqdm is not installed.
        stream: where to write (default ``sys.stderr``).
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        *,
        enabled: bool = True,
        interval: float = 5.0,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.enabled, self.interval = total, desc, enabled, interval
        self.stream = stream if stream is not None else sys.stderr
        self.n = 0
        self._postfix = ""
        self._bar = None
        self._start = self._last = time.monotonic()
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit="rec", file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._print(now)

    def elapsed(self) -> float:
        """Seconds since the bar started."""
        return time.monotonic() - self._start

    def set_postfix(self, text: str) -> None:
        self._postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def _print(self, now: float) -> None:
        rate = self.n / max(now - self._start, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        extra = f" {self._postfix}" if self._postfix else ""
        print(f"{self.desc}: {self.n}{of} records, {rate:.0f}/s{extra}", file=self.stream, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            self._print(time.monotonic())
