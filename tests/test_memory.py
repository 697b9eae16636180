from hypothesis import given, settings
from hypothesis import strategies as st

from niyama.memory import KVBlockManager
from niyama.request import Request
from tests.conftest import CHAT


def _req(i):
    return Request(f"m{i}", 0.0, CHAT, 1, 1)


def test_allocate_grows_by_blocks_and_free_returns_them():
    kv = KVBlockManager(num_blocks=8, block_size=4)
    r = _req(0)
    kv.allocate(r, 5)  # tokens 0..4 → 2 blocks
    assert len(r.block_ids) == 2 and kv.num_free_blocks == 6
    r.num_computed_tokens = 5
    assert kv.blocks_needed(r, 3) == 0  # fits in the second block
    assert kv.blocks_needed(r, 4) == 1
    kv.free(r)
    assert r.block_ids == [] and kv.num_free_blocks == 8 and kv.usage == 0.0


def test_watermark_applies_only_to_admission():
    kv = KVBlockManager(num_blocks=100, block_size=1, watermark=0.1)
    r = _req(0)
    assert kv.can_allocate(r, 90, admit=True) and not kv.can_allocate(r, 91, admit=True)
    assert kv.can_allocate(r, 100) and kv.max_new_tokens(r, admit=True) == 90


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 40), st.booleans()), max_size=120))
def test_block_accounting_never_leaks_or_goes_negative(ops):
    """Random allocate/free sequences: every block is either free or owned by exactly one request."""
    kv = KVBlockManager(num_blocks=32, block_size=4)
    reqs = [_req(i) for i in range(8)]
    for idx, tokens, free in ops:
        r = reqs[idx]
        if free:
            kv.free(r)
            r.num_computed_tokens = 0
        elif kv.can_allocate(r, tokens):
            kv.allocate(r, tokens)
            r.num_computed_tokens += tokens
        else:
            assert kv.max_new_tokens(r) < tokens
        owned = [b for q in reqs for b in q.block_ids]
        assert len(owned) == len(set(owned))
        assert kv.num_free_blocks >= 0
        assert kv.num_free_blocks + len(owned) == kv.num_blocks
        assert set(owned).isdisjoint(kv._free)
        for q in reqs:
            assert len(q.block_ids) == -(-q.num_computed_tokens // kv.block_size)
