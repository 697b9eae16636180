"""Argument types shared by the ``niyama`` subcommands: positive numbers and ``name=value`` lists."""

from __future__ import annotations

import argparse


def positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def mix(text: str) -> dict[str, float]:
    """``name=weight,name=weight`` → dict (a bare ``name`` means weight 1)."""
    out = {}
    for part in filter(None, text.split(",")):
        name, _, weight = part.partition("=")
        try:
            out[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad weight in {part!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("empty mix")
    return out


def mapping(text: str) -> dict[str, str]:
    """``key=value,key=value`` → dict of strings."""
    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"expected key=value, got {part!r}")
        out[key.strip()] = value.strip()
    if not out:
        raise argparse.ArgumentTypeError("empty mapping")
    return out
