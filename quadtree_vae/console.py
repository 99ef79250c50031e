"""The command line's output: results on stdout, notes and warnings on stderr, a tile progress bar."""

from __future__ import annotations

import sys
from collections.abc import Callable
from fractions import Fraction

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


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def describe_frames(t: int, h: int, w: int, fps: Fraction | None) -> str:
    """"image HxW" or "N frames HxW at F fps", for the notes about what was read or written."""
    if t == 1 and fps is None:
        return f"image {h}x{w}"
    return f"{plural(t, 'frame')} {h}x{w}" + (f" at {fps} fps" if fps else "")


def encoded_frames(meta: dict) -> str:
    """The frames an encode took, as the metadata records them: "5 frames (the first 5 of 6)"."""
    source, encoded = meta["frames"], meta["frames_encoded"]
    if meta.get("frames_trimmed"):
        return f"{plural(encoded, 'frame')} (the first {encoded} of {source})"
    if meta.get("frames_padded"):
        return f"{plural(source, 'frame')} (padded to {encoded})"
    return plural(encoded, "frame")


def vae_line(info: dict) -> str:
    """One line about a loaded VAE (``loading.describe`` plus the adapter's facts)."""
    facts = info["facts"]
    factors = f"{facts.spatial_factor}x spatial" + (
        f", {facts.temporal_factor}x temporal" if facts.temporal else ", 2-D")
    rnd = ", RANDOM weights" if info["random"] else ""
    return (f"{info['spec']} ({info['class']}, arch {info['arch']}, {info['params'] / 1e6:.1f}M parameters, "
            f"{info['latent_channels']} latent channels, {factors}{rnd}, fingerprint {info['fingerprint']})")
