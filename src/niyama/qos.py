"""QoS specs, named classes and deadline arithmetic (DESIGN.md §1).

A request is either *interactive* (a first-token deadline ``ttft`` and a token pace ``tbt``) or
*non-interactive* (one deadline ``ttlt`` for the whole answer). Deadlines are cumulative: token n
(n = 1 is the first) is due at ``arrival + ttft + (n - 1) * tbt``, so one late token does not shift
the deadlines after it.
"""

from __future__ import annotations

import enum
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

CLASS_FIELDS = frozenset({"ttft", "tbt", "ttlt", "importance"})  # what a class (or a request) may set
CONFIG_KEYS = frozenset({"classes", "default", "scale", "service_tiers"})  # a config file's top level


class QoSError(ValueError):
    """An invalid QoS spec; ``field`` names the offending field (for HTTP 400 ``param``)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class Importance(enum.IntEnum):
    """Lower value = more important. Under overload, higher values are relegated first."""

    CRITICAL = 0
    STANDARD = 1
    SHEDDABLE = 2

    @classmethod
    def parse(cls, value: str | int | Importance) -> Importance:
        if isinstance(value, Importance):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                names = ", ".join(m.name.lower() for m in cls)
                raise QoSError(f"unknown importance {value!r} (expected one of: {names})",
                               "importance") from None
        raise QoSError(f"importance must be a string, got {value!r}", "importance")


LEAST_IMPORTANT_FIRST = tuple(sorted(Importance, reverse=True))  # the order in which overload sheds levels


@dataclass(frozen=True, slots=True)
class QoS:
    """One request's latency objective. Times are seconds."""

    name: str = "custom"
    ttft: float | None = None
    tbt: float | None = None
    ttlt: float | None = None
    importance: Importance = Importance.STANDARD

    def __post_init__(self) -> None:
        for field in ("ttft", "tbt", "ttlt"):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise QoSError(f"{field} must be a number of seconds, got {value!r}", field)
            if not (value > 0 and math.isfinite(value)):
                raise QoSError(f"{field} must be positive and finite, got {value!r}", field)
        if self.ttlt is not None and (self.ttft is not None or self.tbt is not None):
            raise QoSError("give either ttft/tbt (interactive) or ttlt (non-interactive), not both", "ttlt")
        if self.ttlt is None and (self.ttft is None or self.tbt is None):
            missing = "ttft" if self.ttft is None else "tbt"
            raise QoSError(f"interactive QoS needs both ttft and tbt ({missing} is missing)", missing)

    @property
    def interactive(self) -> bool:
        return self.ttlt is None

    def token_deadline(self, arrival: float, n: int) -> float:
        """Deadline of the n-th output token (n >= 1)."""
        if self.ttlt is not None:
            return arrival + self.ttlt
        return arrival + self.ttft + (n - 1) * self.tbt  # type: ignore[operator]

    def first_token_deadline(self, arrival: float) -> float:
        """The deadline that prefill has to meet: TTFT, or for batch work the whole TTLT."""
        return arrival + (self.ttft if self.ttft is not None else self.ttlt)  # type: ignore[operator]

    def scaled(self, factor: float) -> QoS:
        """The same class on hardware ``factor`` times slower: every SLO multiplied by ``factor``."""

        def mul(v: float | None) -> float | None:
            return None if v is None else v * factor

        return replace(self, ttft=mul(self.ttft), tbt=mul(self.tbt), ttlt=mul(self.ttlt))

    def with_overrides(self, overrides: Mapping[str, Any]) -> QoS:
        """This class with some fields replaced (e.g. a request's ``qos`` object).

        Giving ``ttlt`` clears ttft/tbt and vice versa, so an interactive class can be turned into a
        batch one and back.
        """
        unknown = set(overrides) - CLASS_FIELDS
        if unknown:
            raise QoSError(f"unknown QoS field(s): {', '.join(sorted(unknown))}", sorted(unknown)[0])
        fields: dict[str, Any] = {}
        if "ttlt" in overrides and overrides["ttlt"] is not None:
            fields.update(ttft=None, tbt=None)
        if {"ttft", "tbt"} & set(overrides) and "ttlt" not in overrides:
            fields["ttlt"] = None
            fields.setdefault("ttft", self.ttft)
            fields.setdefault("tbt", self.tbt)
        for key in ("ttft", "tbt", "ttlt"):
            if key in overrides:
                fields[key] = overrides[key]
        if "importance" in overrides:
            fields["importance"] = Importance.parse(overrides["importance"])
        return replace(self, **fields)


class QoSClasses(Mapping[str, QoS]):
    """Named QoS classes plus the default class for requests that name none."""

    def __init__(self, classes: Mapping[str, QoS], default: str):
        if not classes:
            raise QoSError("no QoS classes defined")
        if default not in classes:
            raise QoSError(f"default class {default!r} is not defined", "default")
        self._classes = dict(classes)
        self.default = default

    def __getitem__(self, name: str) -> QoS:
        try:
            return self._classes[name]
        except KeyError:
            known = ", ".join(self._classes)
            raise QoSError(f"unknown QoS class {name!r} (known: {known})", "qos") from None

    def __iter__(self):
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def scaled(self, factor: float) -> QoSClasses:
        return QoSClasses({n: q.scaled(factor) for n, q in self._classes.items()}, self.default)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QoSClasses:
        """Parse ``{default = "...", scale = 1.0, classes = {name = {ttft, tbt | ttlt, importance}}}`` (and
        ``service_tiers``, which the server reads)."""
        unknown = sorted(set(data) - CONFIG_KEYS)
        if unknown:  # a misspelt ``scale`` or ``default`` would otherwise go unnoticed
            raise QoSError(f"QoS config: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(CONFIG_KEYS))})",
                           unknown[0])
        raw = data.get("classes")
        if not isinstance(raw, Mapping) or not raw:
            raise QoSError("QoS config needs a non-empty [classes] table", "classes")
        classes = {}
        for name, spec in raw.items():
            if not isinstance(spec, Mapping):
                raise QoSError(f"class {name!r} must be a table", name)
            unknown = sorted(set(spec) - CLASS_FIELDS)
            if unknown:
                raise QoSError(f"class {name!r}: unknown field(s) {', '.join(unknown)} (known: "
                               f"{', '.join(sorted(CLASS_FIELDS))})", unknown[0])
            try:
                classes[name] = QoS(
                    name=name,
                    ttft=spec.get("ttft"),
                    tbt=spec.get("tbt"),
                    ttlt=spec.get("ttlt"),
                    importance=Importance.parse(spec.get("importance", "standard")),
                ).with_overrides({})
            except QoSError as e:
                raise QoSError(f"class {name!r}: {e}", e.field) from None
        default = data.get("default", next(iter(classes)))
        if not isinstance(default, str):
            raise QoSError(f"default must be a class name, got {default!r}", "default")
        result = cls(classes, default)
        scale = data.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
            raise QoSError(f"scale must be a positive finite number, got {scale!r}", "scale")
        return result.scaled(scale) if scale != 1.0 else result

    @classmethod
    def load(cls, path: str | Path | None = None) -> QoSClasses:
        """Load a TOML class file; ``None`` gives the built-in paper defaults."""
        return cls.from_dict(read_config(path))


def read_config(path: str | Path | None = None) -> dict[str, Any]:
    """The parsed TOML of a QoS config file (``None``: the built-in one), with readable errors."""
    if path is None:
        text = resources.files("niyama").joinpath("qos_classes.toml").read_text()
    else:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise QoSError(f"cannot read QoS config {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise QoSError(f"QoS config {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise QoSError(f"QoS config {path or 'built-in'} is not valid TOML: {e}") from None
