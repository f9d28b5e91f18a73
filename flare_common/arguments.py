"""Command-line flags checked where they are parsed: a number out of range, NaN or infinite is refused in one line
naming the flag (exit code 2), never found deep inside a case. Shared by every command of the project."""
from __future__ import annotations

import argparse
import difflib
import math
import sys
from pathlib import Path

UNRECOGNIZED = "unrecognized arguments: "


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a refused flag said in one line (no usage block above it), exit code 2; a mistyped flag gets the
    closest ones the command has."""

    def error(self, message: str):
        self.exit(2, f"error: {message}{self.suggestion(message)} (see {self.prog} --help)\n")

    def suggestion(self, message: str) -> str:
        if not message.startswith(UNRECOGNIZED):
            return ""
        flags = [word.split("=")[0] for word in message[len(UNRECOGNIZED):].split() if word.startswith("--")]
        known = [name for name in self._option_string_actions if name.startswith("--")]
        close = [match for flag in flags for match in difflib.get_close_matches(flag, known, n=1, cutoff=0.75)]
        return f"; did you mean {' or '.join(dict.fromkeys(close))}?" if close else ""


def program_name(module: str, script: str) -> str:
    """How a command names itself in its help and errors: its console script (`flare-predict`) where it was started
    as one, else `python -m <module>`."""
    return script if Path(sys.argv[0]).name == script else f"python -m {module}"


def number(text: str, low: float | None = None, high: float | None = None, low_open: bool = False) -> float:
    """A finite float within [low, high] (low excluded with `low_open`), as an argparse type."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    below = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or below or (high is not None and value > high):
        if low is not None and high is not None:
            wanted = f"within {'(' if low_open else '['}{low:g}, {high:g}]"
        elif low is not None:
            wanted = f"{'>' if low_open else '>='} {low:g}"
        else:
            wanted = "a finite number"
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
    return value


def integer(text: str, low: int = 0) -> int:
    """An integer >= `low`, as an argparse type."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
    return value


def positive_int(text: str) -> int:
    return integer(text, low=1)


def non_negative_int(text: str) -> int:
    return integer(text, low=0)
