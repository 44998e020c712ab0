"""Arguments several subcommands share: MODEL, --cluster, --global-batch, --seq and whole numbers."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def int_in(low: int, high: int) -> Callable[[str], int]:
    """argparse type factory: a whole number in [low, high] (a bound keeps work finite)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} must be between {low} and {high:,}")
        return value

    parse.__name__ = f"int_in_{low}_{high}"
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (seconds, ...)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """MODEL, --cluster, --global-batch and --seq: what every costing command takes."""
    p.add_argument(
        "model", metavar="MODEL", help="gpt:hidden=..,layers=..; a preset (`autopar models`); file.py:factory"
    )
    p.add_argument(
        "--cluster",
        required=True,
        metavar="CLUSTER",
        help="PRESET, PRESET:N (N devices), PRESET:nodes=4,inter_node_gbps=100, local:N, or a .yaml/.json file",
    )
    p.add_argument("--global-batch", required=True, type=positive_int, metavar="B", help="sequences per step")
    p.add_argument(
        "--seq", type=positive_int, default=None, metavar="S", help="sequence length (default: model's)"
    )
