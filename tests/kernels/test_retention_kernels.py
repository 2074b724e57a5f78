"""Retention kernels against reference.py: the Triton compaction and capacity-sum kernels under
TRITON_INTERPRET=1, and the CPU paths of ops.py, on awkward sizes."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (also in conftest)

import pytest
import torch

from kernels.retention import ops
from kernels.retention.reference import capacity_sum_reference, compact_reference
from kernels.retention.triton_capacity import capacity_bwd_triton, capacity_fwd_triton
from kernels.retention.triton_compact import compact_triton_


def rings(r, h, c, d, seed, ties=False, counts=None):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(r, h, c, 2 * d, generator=g)  # K | V in one tensor, as the engine's ring layout
    pos = torch.stack([torch.stack([torch.sort(torch.randperm(4 * c, generator=g)[:c]).values
                                    for _ in range(h)]) for _ in range(r)]).to(torch.int32)
    lb = -torch.rand(r, h, c, generator=g) * 0.2
    if ties:
        lb[:, 0, : c // 2] = 0.0                      # many equal scores (beta = 1)
        lb[:, -1] = -0.05
        pos[:, -1] = torch.arange(c, dtype=torch.int32)  # equal log beta, distinct positions
    count = torch.full((r,), c) if counts is None else torch.tensor(counts)
    t = torch.full((r,), 4 * c + 1)
    return kv, pos, lb, count, t


CASES = [  # (rings, heads, capacity, head dim, budget, ties, counts, sinks)
    (3, 2, 37, 5, 11, False, None, 0),
    (2, 3, 300, 64, 129, True, [300, 211], 4),
    (4, 1, 65, 3, 64, True, [65, 64, 10, 1], 0),   # counts at, below and far below the budget
    (1, 2, 8, 16, 8, False, None, 0),
    (2, 2, 50, 4, 7, True, None, 40),              # more sinks than budget: the newest sinks win
]


@pytest.mark.parametrize("r,h,c,d,m,ties,counts,sinks", CASES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_compaction_matches_reference(r, h, c, d, m, ties, counts, sinks, impl):
    kv, pos, lb, count, t = rings(r, h, c, d, seed=c, ties=ties, counts=counts)
    want = compact_reference(kv[..., :d], kv[..., d:], pos, lb, count, t, m, sinks)
    kv2, pos2, lb2 = kv.clone(), pos.clone(), lb.clone()
    fn = compact_triton_ if impl == "triton" else ops.compact_torch_
    new_count = fn(kv2[..., :d], kv2[..., d:], pos2, lb2, count, t, m, sinks)  # strided views, in place
    assert torch.equal(new_count, want[4])
    for r_ in range(r):
        n = int(want[4][r_])
        assert torch.equal(kv2[r_, :, :n, :d], want[0][r_, :, :n])
        assert torch.equal(kv2[r_, :, :n, d:], want[1][r_, :, :n])
        assert torch.equal(pos2[r_, :, :n], want[2][r_, :, :n])
        assert torch.equal(lb2[r_, :, :n], want[3][r_, :, :n])
        if count[r_] <= m:  # nothing moves
            assert torch.equal(kv2[r_], kv[r_]) and torch.equal(pos2[r_], pos[r_])
    if sinks:  # every kept head holds the positions below `sinks` it had (up to the budget)
        for r_ in range(r):
            for hh in range(h):
                n = int(want[4][r_])
                low = pos[r_, hh, : int(count[r_])]
                low = low[low < sinks]
                assert set(low.tolist()[-n:]) <= set(pos2[r_, hh, :n].tolist())
    if ties and h > 1:  # the heads really kept different positions
        n = int(want[4][0])
        assert not torch.equal(pos2[0, 0, :n], pos2[0, -1, :n])


def test_compaction_half_precision_side_table():
    kv, pos, lb, count, t = rings(2, 2, 40, 8, seed=1)
    lb16 = lb.half()
    want = compact_reference(kv[..., :8], kv[..., 8:], pos, lb16.float(), count, t, 13)
    kv2, pos2, lb2 = kv.clone(), pos.clone(), lb16.clone()
    compact_triton_(kv2[..., :8], kv2[..., 8:], pos2, lb2, count, t, 13)
    assert torch.equal(pos2[:, :, :13], want[2][:, :, :13])
    assert torch.equal(lb2[:, :, :13].float(), want[3][:, :, :13])


@pytest.mark.parametrize("shape", [(3, 1), (2, 129), (4, 300)])
def test_capacity_sum_kernels(shape):
    g = torch.Generator().manual_seed(shape[1])
    lb = -torch.rand(shape, generator=g) * 0.3
    lb[0, : shape[1] // 3] = 0.0  # beta = 1: S_t grows like t
    want = capacity_sum_reference(lb)
    torch.testing.assert_close(capacity_fwd_triton(lb), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ops._capacity_fwd_cpu(lb), want, rtol=1e-5, atol=1e-4)
    gout = torch.randn(shape, generator=g)
    x = lb.clone().requires_grad_()
    (want_grad,) = torch.autograd.grad((capacity_sum_reference(x) * gout).sum(), x)
    torch.testing.assert_close(capacity_bwd_triton(lb, gout), want_grad, rtol=1e-4, atol=1e-3)
    x = lb.clone().requires_grad_()
    (got,) = torch.autograd.grad((ops.capacity_sum(x) * gout).sum(), x)
    torch.testing.assert_close(got, want_grad, rtol=1e-4, atol=1e-3)


def test_capacity_sum_keeps_leading_dims():
    lb = -torch.rand(2, 3, 4, 50) * 0.1
    torch.testing.assert_close(ops.capacity_sum(lb), capacity_sum_reference(lb), rtol=1e-5, atol=1e-5)
