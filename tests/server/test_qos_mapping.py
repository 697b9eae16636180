"""QoS selection rules (no server): precedence, overrides, service tiers and field-naming errors."""

from __future__ import annotations

import pytest

from niyama.qos import Importance, QoSClasses, QoSError
from niyama.server.qos_mapping import QoSPolicy
from tests.server.conftest import QOS_CONFIG


@pytest.fixture(scope="module")
def policy() -> QoSPolicy:
    return QoSPolicy.load(QOS_CONFIG)


def test_default_and_precedence(policy):
    assert policy.resolve(None, None, None).name == "interactive"
    assert policy.resolve(None, None, "flex").name == "batch-10m"
    assert policy.resolve(None, None, "auto").name == "interactive"
    assert policy.resolve(None, "batch-30m", "flex").name == "batch-30m"
    assert policy.resolve("batch-10m", "batch-30m", "priority").name == "batch-10m"


def test_object_overrides_keep_class_name(policy):
    q = policy.resolve({"class": "interactive", "ttft": 2.0, "importance": "critical"}, None, None)
    assert (q.name, q.ttft, q.tbt, q.importance) == ("interactive", 2.0, 0.4, Importance.CRITICAL)
    q = policy.resolve({"ttlt": 60}, "batch-30m", None)
    assert (q.name, q.ttlt, q.interactive) == ("batch-30m", 60, False)


@pytest.mark.parametrize(("qos", "header", "tier", "field"), [
    ("nope", None, None, "qos"),
    ({"class": "nope"}, None, None, "qos.class"),
    ({"tbt": 0}, None, None, "qos.tbt"),
    ({"importance": "vip"}, None, None, "qos.importance"),
    (3, None, None, "qos"),
    ({"class": [1]}, None, None, "qos.class"),
    (None, "nope", None, "X-Niyama-QoS"),
    (None, None, "gold", "service_tier"),
])
def test_errors_name_the_field(policy, qos, header, tier, field):
    with pytest.raises(QoSError) as e:
        policy.resolve(qos, header, tier)
    assert e.value.field == field


def test_tier_echo(policy):
    assert policy.tier_of(policy.resolve(None, None, "flex"), "flex") == "flex"
    assert policy.tier_of(policy.resolve("batch-10m", None, None), None) == "flex"
    assert policy.tier_of(policy.resolve("batch-30m", None, None), None) == "default"
    assert policy.tier_of(policy.resolve("batch-30m", None, "auto"), "auto") == "default"
    # The class that serves the request decides: a qos field overriding the tier is what the client gets.
    assert policy.tier_of(policy.resolve("interactive", None, "flex"), "flex") == "priority"
    # The default class is also the one "priority" maps to: a request that did not ask for it is "default".
    assert policy.tier_of(policy.resolve(None, None, None), None) == "default"
    assert policy.tier_of(policy.resolve(None, None, "default"), "default") == "default"
    assert policy.tier_of(policy.resolve(None, None, "priority"), "priority") == "priority"


def test_tier_echo_follows_the_tier_table_as_resolve_does():
    classes = {"classes": {"chat": {"ttft": 1.0, "tbt": 0.1}, "bulk": {"ttlt": 60.0}}, "default": "chat"}
    policy = QoSPolicy(QoSClasses.from_dict(classes), {"priority": "chat", "default": "bulk", "auto": "bulk"})
    # No tier: the default class serves it (not the "default" tier's), and it asked for no priority.
    assert policy.tier_of(policy.resolve(None, None, None), None) == "default"
    assert policy.tier_of(policy.resolve(None, None, "auto"), "auto") == "default"  # auto is answered as default
    assert policy.tier_of(policy.resolve(None, None, "default"), "default") == "default"
    assert policy.tier_of(policy.resolve("bulk", None, "priority"), "priority") == "default"


def test_builtin_classes_map_tiers():
    policy = QoSPolicy.load(None)
    assert policy.resolve(None, None, "priority").name == "interactive"
    assert policy.resolve(None, None, "flex").name == "batch-10m"


@pytest.mark.parametrize(("tiers", "message"), [('priority = "gold"', "unknown class 'gold'"),
                                                ("priority = [1]", r"unknown class \[1\]"),
                                                ('gold = "chat"', "unknown service tier 'gold'")])
def test_bad_tier_tables_are_config_errors(tmp_path, tiers, message):
    path = tmp_path / "qos.toml"
    path.write_text(f"[classes.chat]\nttft = 1\ntbt = 0.1\n[service_tiers]\n{tiers}\n")
    with pytest.raises(QoSError, match=message):
        QoSPolicy.load(path)
