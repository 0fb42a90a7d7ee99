"""argparse value types shared by the subcommands (the leading underscore keeps this module
out of the subcommand scan in `worker/cli/__init__.py`)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """A decimal integer > 0; anything else is an argparse usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value
