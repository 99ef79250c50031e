"""The command line's output: results on stdout, notes and warnings on stderr, a tile progress bar."""

from __future__ import annotations

import sys
from collections.abc import Callable

RANDOM_NOTE = "random weights: output is not a real image"



class Console:
    """Where messages go: results on stdout; notes on stderr (hidden by --quiet); warnings always."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def result(self, msg: str = "") -> None:
        print(msg, file=sys.stdout, flush=True)

    def note(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def note_start(self, msg: str) -> None:
        """The first part of a note line, finished by the next ``note``."""
        if not self.quiet:
            print(msg, end="", file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


class TileBar:
    """A tqdm bar over tiles x time chunks (x items when a batch runs item by item), with ETA.

    ``part(k)`` gives the ``progress(done, total)`` callback for item ``k`` of ``parts``."""

    def __init__(self, desc: str, enabled: bool, parts: int = 1):
        self.desc, self.enabled, self.parts = desc, enabled, parts
        self.bar = None
        self.shown = 0

    def part(self, k: int) -> Callable[[int, int], None] | None:
        if not self.enabled:
            return None

        def progress(done: int, total: int) -> None:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total * self.parts, desc=self.desc, unit="tile", file=sys.stderr,
                                dynamic_ncols=True, mininterval=0.25, leave=False)
            n = k * total + done
            if n > self.shown:
                self.bar.update(n - self.shown)
                self.shown = n

        return progress

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_enabled(args) -> bool:
    if args.quiet:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
