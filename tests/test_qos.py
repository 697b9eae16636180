import pytest

from niyama.qos import Importance, QoS, QoSClasses, QoSError


def test_cumulative_token_deadlines_do_not_shift():
    qos = QoS(ttft=6.0, tbt=0.05)
    assert qos.token_deadline(10.0, 1) == pytest.approx(16.0)
    assert qos.token_deadline(10.0, 2) == pytest.approx(16.05)
    assert qos.token_deadline(10.0, 101) == pytest.approx(21.0)
    assert qos.first_token_deadline(10.0) == pytest.approx(16.0)


def test_batch_deadline_is_the_same_for_every_token():
    qos = QoS(ttlt=600.0)
    assert not qos.interactive
    assert qos.token_deadline(5.0, 1) == qos.token_deadline(5.0, 1000) == 605.0
    assert qos.first_token_deadline(5.0) == 605.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ttft": -1.0, "tbt": 0.05}, "ttft"),
        ({"ttft": 1.0, "tbt": 0.0}, "tbt"),
        ({"ttft": 1.0}, "tbt"),
        ({"tbt": 0.05}, "ttft"),
        ({}, "ttft"),
        ({"ttft": 1.0, "tbt": 0.05, "ttlt": 10.0}, "ttlt"),
        ({"ttlt": "soon"}, "ttlt"),
        ({"ttlt": float("inf")}, "ttlt"),
        ({"ttft": float("nan"), "tbt": 0.05}, "ttft"),
    ],
)
def test_invalid_specs_name_their_field(kwargs, field):
    with pytest.raises(QoSError) as e:
        QoS(**kwargs)
    assert e.value.field == field


def test_builtin_classes_are_the_papers():
    classes = QoSClasses.load()
    assert classes.default == "interactive"
    assert classes["interactive"] == QoS("interactive", ttft=6.0, tbt=0.05)
    assert classes["batch-10m"].ttlt == 600.0
    assert classes["batch-30m"].ttlt == 1800.0


def test_unknown_class_is_a_clear_error():
    with pytest.raises(QoSError, match="unknown QoS class 'gold'.*interactive"):
        QoSClasses.load()["gold"]


def test_config_file_with_scale_and_importance(tmp_path):
    path = tmp_path / "qos.toml"
    path.write_text('default = "chat"\nscale = 10\n[classes.chat]\nttft = 1.0\ntbt = 0.1\n'
                    'importance = "critical"\n[classes.nightly]\nttlt = 60\nimportance = "sheddable"\n')
    classes = QoSClasses.load(path)
    assert classes.default == "chat"
    assert classes["chat"].ttft == pytest.approx(10.0) and classes["chat"].tbt == pytest.approx(1.0)
    assert classes["chat"].importance is Importance.CRITICAL
    assert classes["nightly"].ttlt == pytest.approx(600.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[classes.x]\nttft = 1\n", "needs both ttft and tbt"),
        ("[classes.x]\nttlt = -5\n", "must be positive"),
        ('default = "y"\n[classes.x]\nttlt = 5\n', "default class 'y'"),
        ("[classes.x]\nttlt = 5\nimportance = 'vip'\n", "unknown importance"),
        ("classes = 3\n", "non-empty"),
        ("[classes.x\n", "not valid TOML"),
        ("[classes.x]\nttlt = 5\nimportanc = 'critical'\n", "unknown field"),  # a typo is not ignored
        ("default = [1]\n[classes.x]\nttlt = 5\n", "default must be a class name"),
        ("scale = nan\n[classes.x]\nttlt = 5\n", "scale must be a positive finite number"),
        ("scale = inf\n[classes.x]\nttlt = 5\n", "scale must be a positive finite number"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "qos.toml"
    path.write_text(text)
    with pytest.raises(QoSError, match=message):
        QoSClasses.load(path)


def test_overrides_switch_kind_and_keep_the_rest():
    chat = QoS("interactive", ttft=6.0, tbt=0.05)
    assert chat.with_overrides({"ttft": 2.0}) == QoS("interactive", ttft=2.0, tbt=0.05)
    batch = chat.with_overrides({"ttlt": 100.0, "importance": "critical"})
    assert batch.ttlt == 100.0 and batch.ttft is None and batch.importance is Importance.CRITICAL
    assert batch.with_overrides({"ttft": 1.0, "tbt": 0.1}).interactive
    with pytest.raises(QoSError, match="unknown QoS field"):
        chat.with_overrides({"deadline": 3})
