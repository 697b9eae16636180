"""Argument types shared by the ``niyama`` subcommands: checked numbers and ``name=value`` lists."""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path


def _number(text: str, convert, what: str):
    """``convert(text)``, with argparse's error naming ``what`` was expected rather than the type function."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _finite(text: str) -> float:
    value = _number(text, float, "a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def gib_bytes(text: str) -> int:
    """A memory size given in GiB, as bytes (at least one)."""
    size = int(positive(text) * (1 << 30))
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least one byte (9.3e-10 GiB), got {text} GiB")
    return size


def non_negative(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def percent(text: str) -> float:
    value = positive(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"must be a percentage in (0, 100], got {text}")
    return value


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def positive_int(text: str) -> int:
    value = _number(text, int, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def int_mapping(text: str) -> dict[str, int]:
    """``key=integer,...`` → dict (e.g. vLLM priorities per class)."""
    out = {}
    for key, value in mapping(text).items():
        try:
            out[key] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}={value}: not an integer") from None
    return out


def at_least(minimum: int):
    """An integer type that refuses values below ``minimum``."""

    def check(text: str) -> int:
        value = _number(text, int, f"an integer >= {minimum}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value

    return check


non_negative_int = at_least(0)


def int_between(low: int, high: int):
    """An integer type that refuses values outside [low, high]."""

    def check(text: str) -> int:
        value = _number(text, int, f"an integer from {low} to {high}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text}")
        return value

    return check


def port(text: str) -> int:
    value = _number(text, int, "a TCP port (1-65535)")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), got {text}")
    return value


def _can_write_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried: permission bits say yes for root even in /proc)."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def ensure_writable_dir(path: Path) -> None:
    """Create ``path`` if needed and check that a file can be written in it: before a long run, not when
    its results are saved."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the output directory {path}: {e.strerror}") from None
    if not _can_write_in(path):
        raise PermissionError(f"cannot write in {path}")


def output_file(text: str) -> Path:
    """A file to write at the end of a long run: its folder must exist, writable, now."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {path.parent}")
    if not _can_write_in(path.parent):
        raise argparse.ArgumentTypeError(f"cannot write in {path.parent}")
    return path


def file_stem(text: str) -> str:
    """A name for files in the output folder: no folder parts."""
    if not text or text in (".", "..") or "/" in text or "\\" in text:
        raise argparse.ArgumentTypeError(f"must be a file name without folders, got {text!r}")
    return text


def mix(text: str) -> dict[str, float]:
    """``name=weight,name=weight`` → dict (a bare ``name`` means weight 1)."""
    out = {}
    for part in filter(None, text.split(",")):
        name, _, weight = part.partition("=")
        if name.strip() in out:
            raise argparse.ArgumentTypeError(f"{name.strip()} is given twice in {text!r}")
        try:
            out[name.strip()] = non_negative(weight) if weight else 1.0
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"bad weight in {part!r} (a finite number >= 0)") from None
    if not out:
        raise argparse.ArgumentTypeError("empty mix")
    return out


def threshold(text: str) -> tuple[str, float]:
    """``metric:value`` (e.g. ``ttft:500``, as `vllm bench serve --goodput` takes it) → (metric, value)."""
    name, sep, value = text.partition(":")
    try:
        if not sep:
            raise ValueError(text)
        return name.strip(), positive(value)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected metric:milliseconds with a positive number, got {text!r}") from None


def mapping(text: str) -> dict[str, str]:
    """``key=value,key=value`` → dict of strings."""
    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"expected key=value, got {part!r}")
        if key.strip() in out:
            raise argparse.ArgumentTypeError(f"{key.strip()} is given twice in {text!r}")
        out[key.strip()] = value.strip()
    if not out:
        raise argparse.ArgumentTypeError("empty mapping")
    return out
