"""Argument types and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import contextlib
from fractions import Fraction
from typing import Iterator


def eps_value(text: str) -> float:
    """A threat radius: ``0.031`` or ``8/255``, >= 0."""
    try:
        v = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"invalid eps '{text}': give a number such as 0.031 or 8/255") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"eps must be >= 0, got {text}")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (None: leave torch's choice), then restore the old count."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
