"""How a long operation tells its caller what it is doing: one ``Reporter`` passed down to every
stage (the CLI's prints to the terminal, ``NullReporter`` says nothing), instead of a callback
per kind of news. Stdlib only.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, n: int) -> None:
        """``n`` more bytes are done."""

    def start(self, total: int) -> None:
        """(Re)start with ``total`` bytes to go."""

    def close(self) -> None: ...


class Reporter(Protocol):
    """What a build tells its caller while it runs. Results come back as return values."""

    def stage(self, stage: str, message: str) -> None:
        """A stage began or finished (``==> stage: message`` on a terminal)."""

    def log(self, line: str) -> None:
        """A line of a long log (Olive's, an image build's): may be shown or dropped."""

    def event(self, message: str) -> None:
        """A step inside a stage worth showing even when quiet (a blob pushed, fetched)."""

    def warn(self, message: str) -> None: ...

    def progress(self, what: str, total: int) -> Progress:
        """A byte counter for a long transfer."""


class _NoProgress:
    def __call__(self, n: int) -> None:
        pass

    def start(self, total: int) -> None:
        pass

    def close(self) -> None:
        pass


class NullReporter:
    """Hears everything, says nothing."""

    def stage(self, stage: str, message: str) -> None:
        pass

    def log(self, line: str) -> None:
        pass

    def event(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def progress(self, what: str, total: int) -> Progress:
        return _NoProgress()
