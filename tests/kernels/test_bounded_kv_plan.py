"""The bounded ring's per-step plan (kernels/vllm_plugin/bounded_kv/plan.py) against the reference's
piece splitting (kernels/retention/reference.BoundedCache), and its ring arithmetic against a replay of
the steps: no vLLM needed. tests/integration/test_bounded_kv_engine.py runs the real engine."""
import random

import pytest
import torch

from kernels.retention.reference import BoundedCache, RetentionPolicy
from kernels.vllm_plugin.bounded_kv.config import BoundedKVConfig
from kernels.vllm_plugin.bounded_kv.plan import plan_step, ring_count


@pytest.mark.parametrize("m,b", [(4, 3), (16, 16), (128, 128), (5, 1)])
def test_ring_count_matches_the_reference_cache(m, b):
    """The count after n tokens, from the reference's own piece splitting (a fake layer holds cnt tokens)."""
    cache = BoundedCache(1, m, b, RetentionPolicy())
    cnt = n = 0
    for step in [1, 7, 1, 1, 30, 2, 1, 300, 1, 3, 129, 1]:
        cache.layers[0].k = torch.zeros(1, cnt, 1)
        for piece in cache.pieces(step):
            n += piece
            cnt = m if cnt + piece >= m + b else cnt + piece
        assert int(ring_count(torch.tensor(n), m, b)) == cnt == BoundedKVConfig(m, b, "").ring_count(n)


def replay(steps, m, b):
    """steps: list of (query lengths per request); every request runs in every step."""
    c = m + b
    r = len(steps[0])
    rings = torch.arange(1, r + 1, dtype=torch.int32) * 3  # arbitrary ring block ids
    seen = torch.zeros(r, dtype=torch.long)
    counts = {int(x): 0 for x in rings}
    for qlens in steps:
        q = torch.tensor(qlens)
        qsl = torch.zeros(r + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(q, 0)
        seq = seen + q
        rounds = plan_step(qsl, seq.to(torch.int32), rings, m, b, int(q.sum()))
        covered = []
        for rd in rounds:
            toks = torch.arange(int(q.sum())) if rd.tokens is None else rd.tokens
            covered += toks.tolist()
            assert rd.slot_mapping.tolist() == (rd.token_rings * c + rd.slots).tolist()
            assert int(rd.slots.max()) < c and int(rd.slots.min()) >= 0
            req = torch.arange(r) if rd.req is None else rd.req
            for j, ri in enumerate(req.tolist()):
                ring = int(rings[ri])
                n_new = int(rd.query_start_loc[j + 1] - rd.query_start_loc[j])
                mine = rd.slots[rd.query_start_loc[j]:rd.query_start_loc[j + 1]].tolist()
                assert mine == list(range(counts[ring], counts[ring] + n_new))
                counts[ring] += n_new
                assert int(rd.ring_lens[j]) == counts[ring] <= c
                pos = rd.positions[rd.query_start_loc[j]:rd.query_start_loc[j + 1]].tolist()
                assert pos == list(range(int(seen[ri]), int(seen[ri]) + n_new))
                seen[ri] += n_new
                if counts[ring] == c:
                    k = rd.compact_rings.tolist().index(ring)
                    assert int(rd.compact_t[k]) == int(seen[ri]) + 1
                    counts[ring] = m
            assert len(rd.compact_rings) == sum(1 for j in range(len(req)) if int(rd.ring_lens[j]) == c)
        assert sorted(covered) == list(range(int(q.sum())))
        for ri in range(r):
            assert counts[int(rings[ri])] == int(ring_count(seen[ri], m, b))


@pytest.mark.parametrize("m,b", [(4, 3), (8, 8), (5, 1)])
def test_plan_replays_like_the_reference(m, b):
    rnd = random.Random(m * 100 + b)
    steps = [[rnd.choice([1, 1, 2, 5, 17, 40]) for _ in range(4)] for _ in range(30)]
    replay(steps, m, b)


def test_decode_steps_are_one_round_over_the_whole_batch():
    m, b = 8, 4
    qsl = torch.arange(0, 5, dtype=torch.int32)
    seq = torch.tensor([5, 11, 12, 300], dtype=torch.int32)
    rounds = plan_step(qsl, seq, torch.tensor([1, 2, 3, 4]), m, b, 4)
    assert len(rounds) == 1 and rounds[0].tokens is None and rounds[0].req is None
        # 11 seen -> slot 11 fills the ring (C = 12); 299 seen -> 8 + 291 % 4 = 11 -> full too
    assert rounds[0].ring_lens.tolist() == [5, 11, 12, 12]
    assert rounds[0].compact_rings.tolist() == [3, 4]
    assert rounds[0].compact_t.tolist() == [13, 301]


def test_long_prefill_is_split_into_rounds_where_the_ring_fills():
    m, b = 8, 4
    qsl = torch.tensor([0, 30], dtype=torch.int32)
    rounds = plan_step(qsl, torch.tensor([30]), torch.tensor([7]), m, b, 30)
    assert [int(r.query_start_loc[-1]) for r in rounds] == [12, 4, 4, 4, 4, 2]
    assert [r.compact_rings.tolist() for r in rounds] == [[7]] * 5 + [[]]
