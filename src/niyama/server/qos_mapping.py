"""From what a client sends (``qos`` field, ``X-Niyama-QoS`` header, ``service_tier``) to a ``QoS``.

Precedence: the body's ``qos`` field, then the header, then ``service_tier`` (mapped to a class by the
``[service_tiers]`` table of the QoS config), then the configured default class. A ``qos`` object names a
class (or inherits the one chosen by header/tier/default) and overrides any of its fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from niyama.qos import QoS, QoSClasses, QoSError, read_config

SERVICE_TIERS = ("auto", "default", "flex", "priority")
DEFAULT_TIER_MAP = {"priority": "interactive", "flex": "batch-10m"}


@dataclass(frozen=True)
class QoSPolicy:
    classes: QoSClasses
    service_tiers: Mapping[str, str] = field(default_factory=dict)  # tier → class; unmapped → default

    @classmethod
    def load(cls, path: str | Path | None = None) -> QoSPolicy:
        """Classes and the ``[service_tiers]`` table from one TOML file (None: the built-in classes)."""
        data = read_config(path)
        classes = QoSClasses.from_dict(data)
        known = set(classes)
        tiers = data.get("service_tiers", {k: v for k, v in DEFAULT_TIER_MAP.items() if v in known})
        if not isinstance(tiers, Mapping):
            raise QoSError("[service_tiers] must be a table of tier = class", "service_tiers")
        for tier, name in tiers.items():
            if tier not in SERVICE_TIERS:
                raise QoSError(f"unknown service tier {tier!r} in [service_tiers] "
                               f"(OpenAI's are: {', '.join(SERVICE_TIERS)})", "service_tiers")
            if not isinstance(name, str) or name not in known:
                raise QoSError(f"service tier {tier!r} maps to unknown class {name!r}", "service_tiers")
        return cls(classes, dict(tiers))

    def resolve(self, qos: str | Mapping[str, Any] | None, header: str | None,
                service_tier: str | None) -> QoS:
        """The request's QoS; raises ``QoSError`` whose ``field`` is the request field to blame."""
        base, base_field = self.classes.default, None
        if service_tier is not None:
            if service_tier not in SERVICE_TIERS:
                raise QoSError(f"unknown service_tier {service_tier!r} (expected one of: "
                               f"{', '.join(SERVICE_TIERS)})", "service_tier")
            base, base_field = self.service_tiers.get(service_tier, base), "service_tier"
        if header is not None:
            base, base_field = header.strip(), "X-Niyama-QoS"
        if isinstance(qos, str):
            base, base_field, overrides = qos, "qos", {}
        elif isinstance(qos, Mapping):
            overrides = {k: v for k, v in qos.items() if v is not None}
            if "class" in overrides:
                base, base_field = overrides.pop("class"), "qos.class"
                if not isinstance(base, str):
                    raise QoSError(f"qos.class must be a class name, got {base!r}", base_field)
        elif qos is None:
            overrides = {}
        else:
            raise QoSError("qos must be a class name or an object {class, ttft, tbt, ttlt, importance}", "qos")
        try:
            cls = self.classes[base]
        except QoSError as e:
            raise QoSError(str(e), base_field) from None
        try:
            return cls.with_overrides(overrides)
        except QoSError as e:
            raise QoSError(str(e), f"qos.{e.field}" if e.field else "qos") from None

    def tier_of(self, qos: QoS, service_tier: str | None) -> str:
        """The ``service_tier`` echoed in responses: the one asked for (``auto`` or none: ``default``, as
        OpenAI does) when it serves the class actually used, else a tier that serves that class (a ``qos``
        field or header may override the tier asked for), else the one asked for."""
        asked = "default" if service_tier in (None, "auto") else service_tier
        # The class ``resolve`` gives the tier asked for (no tier: the default class, whatever "default" maps to).
        default = self.classes.default
        served = default if service_tier is None else self.service_tiers.get(service_tier, default)
        if served == qos.name:
            return asked
        return next((t for t, c in self.service_tiers.items() if c == qos.name and t != "auto"), asked)
