"""Incremental detokenization: token by token, the reported text is the whole output's decoded text."""

from __future__ import annotations

import random

import pytest

from niyama.engine import SamplingParams
from niyama.engine.core import _Detokenizer
from tests.engine.helpers import make_request

TEXTS = [
    "Paris is the capital of France.  Its name comes from the Parisii, a Gallic tribe.\n\n- one\n- two",
    "Zürich, São Paulo, Kraków; 東京 and 北京 — naïve café «quotes» ½ °C 🙂🚀 end",
    "def f(x):\n    return {'a': [x, x ** 2]}  # comment\n\tTabs\tand   runs of   spaces",
]


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[str, bool, int]:
    """Feed ``ids`` one token at a time; the text reported, whether a stop string ended it, tokens used."""
    detok = _Detokenizer(SamplingParams(stop=stop))
    request = make_request("r", [1], len(ids))
    out = []
    for i, token in enumerate(ids):
        request.append_token(token, 0.0)
        final = i == len(ids) - 1
        stopped = detok.update(tokenizer, request, final)
        out.append(detok.delta(final or stopped))
        if stopped:
            return "".join(out), True, i + 1
    return "".join(out), False, len(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_is_the_decoded_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert stream(tokenizer, ids)[0] == tokenizer.decode(ids) == text


def test_random_tokens_split_characters_anywhere(tokenizer):
    """Byte-level tokens in any order: partial UTF-8 characters are held back until completed, and an
    output that ends inside one reads as the whole decode does."""
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))]
        assert stream(tokenizer, ids)[0] == tokenizer.decode(ids)


def test_a_stop_string_across_tokens_cuts_the_text(tokenizer):
    ids = tokenizer.encode(TEXTS[0])
    text, stopped, used = stream(tokenizer, ids, stop=("Gallic",))
    assert stopped and text == TEXTS[0][:TEXTS[0].index("Gallic")]
    assert "Gallic" in tokenizer.decode(ids[:used]) and "Gallic" not in tokenizer.decode(ids[:used - 1])


def test_each_token_decodes_a_short_window(tokenizer):
    """The work per token does not grow with the output (re-decoding all of it was quadratic)."""
    decoded = []

    class Counting:
        def decode(self, ids):
            decoded.append(len(ids))
            return tokenizer.decode(ids)

    ids = tokenizer.encode(" ".join(TEXTS * 8))
    assert stream(Counting(), ids)[0] == tokenizer.decode(ids)
    assert len(ids) > 300 and max(decoded) <= 8
