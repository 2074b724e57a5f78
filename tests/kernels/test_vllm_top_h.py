"""The Top-H logits processors' bookkeeping on CPU tensors, with vLLM's own BatchUpdate / SamplingParams /
LogitsContext: which batch row (TopHV1) or request slot (TopHV2) gets which alpha and temperature after
requests are added, removed, moved and swapped, checked row by row against kernels/top_h/reference.py."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate  # noqa: E402
from vllm.v1.sample.logits_processor.interface import MoveDirectionality  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext  # noqa: E402

from kernels.top_h.reference import top_h_filter_reference  # noqa: E402
from kernels.vllm_plugin.top_h import TopHV1, TopHV2  # noqa: E402

V = 500
SWAP, ONE_WAY = MoveDirectionality.SWAP, MoveDirectionality.UNIDIRECTIONAL


def params(alpha=None, temperature=1.0):
    return SamplingParams(temperature=temperature, extra_args=None if alpha is None else {"top_h": alpha})


def logits(b, seed=0):
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


def expect_v1(x, alphas):
    """What TopHV1 must do to a batch: row i filtered with alphas[i] (None: untouched). It runs after vLLM's
    temperature, so the rule sees the logits as they are."""
    return torch.stack([row if a is None else top_h_filter_reference(row[None], a)[0] for row, a in zip(x, alphas)])


def update(v1, batch_size, removed=(), added=(), moved=()):
    v1.update_state(BatchUpdate(batch_size=batch_size, removed=list(removed),
                                added=[(i, p, None, []) for i, p in added], moved=list(moved)))


def check_v1(v1, alphas, seed):
    x = logits(len(alphas), seed)
    want = expect_v1(x, alphas)
    got = v1.apply(x.clone())
    assert torch.equal(torch.isinf(got), torch.isinf(want)), alphas
    torch.testing.assert_close(got[torch.isfinite(got)], want[torch.isfinite(want)])


def test_v1_rows_follow_adds_removes_moves_and_swaps():
    v1 = TopHV1(None, torch.device("cpu"), False)
    update(v1, 4, added=[(0, params(0.3)), (1, params()), (2, params(0.6)), (3, params(1.0))])
    check_v1(v1, [0.3, None, 0.6, None], 1)  # alpha 1 keeps everything: not tracked at all
    assert set(v1.alpha) == {0, 2}
    # Row 0 finishes; vLLM condenses the batch by moving row 2 into the hole.
    update(v1, 3, removed=[0], moved=[(2, 0, ONE_WAY)])
    check_v1(v1, [0.6, None, None], 2)
    # Reordering swaps rows 0 and 1.
    update(v1, 3, moved=[(0, 1, SWAP)])
    check_v1(v1, [None, 0.6, None], 3)
    # A new Top-H request lands on row 2, a plain one replaces row 1 (same index, no removal first).
    update(v1, 3, added=[(2, params(0.2)), (1, params())])
    check_v1(v1, [None, None, 0.2], 4)
    # Swaps: Top-H row with a plain one (both directions), two Top-H rows with each other.
    update(v1, 3, moved=[(2, 0, SWAP)])
    check_v1(v1, [0.2, None, None], 5)
    update(v1, 3, moved=[(1, 0, SWAP)])
    check_v1(v1, [None, 0.2, None], 6)
    update(v1, 3, added=[(2, params(0.5))])
    update(v1, 3, moved=[(1, 2, SWAP)])
    check_v1(v1, [None, 0.5, 0.2], 7)
    # Moving a plain row over a Top-H one, and a Top-H row over a Top-H one, overwrite it.
    update(v1, 3, moved=[(0, 1, ONE_WAY)])
    check_v1(v1, [None, None, 0.2], 8)
    update(v1, 3, added=[(0, params(0.9))])
    update(v1, 2, removed=[2], moved=[(0, 2, ONE_WAY)])
    check_v1(v1, [None, None, 0.9], 9)
    update(v1, 3, removed=[2])
    assert v1.alpha == {} and v1._rows is None


def test_v1_no_update_and_no_top_h_rows_leave_logits_alone():
    v1 = TopHV1(None, torch.device("cpu"), False)
    v1.update_state(None)
    x = logits(2)
    assert v1.apply(x) is x and torch.equal(x, logits(2))


def test_v1_rejects_bad_alpha_at_admission():
    with pytest.raises(ValueError, match=r"top_h must be a number in \(0, 1\]"):
        TopHV1.validate_params(params(1.5))


def ctx(slots):
    m = torch.tensor(slots, dtype=torch.long)
    z = torch.zeros(len(slots), dtype=torch.long)
    return LogitsContext(expanded_idx_mapping=m, idx_mapping=m, idx_mapping_np=np.array(slots),
                         expanded_local_pos=z, input_ids=z, pos=z, seq_lens_upper_bound_np=np.ones(len(slots)))


def expect_v2(x, per_row):
    """TopHV2 runs before vLLM's temperature, so the rule applies each row's temperature itself, and the
    returned logits stay unscaled. per_row[i]: (alpha, temperature) or None (untouched)."""
    rows = [row if s is None else top_h_filter_reference(row[None], s[0], s[1])[0] for row, s in zip(x, per_row)]
    return torch.stack(rows)


def check_v2(v2, slots, per_row, seed):
    x = logits(len(slots), seed)
    want = expect_v2(x, per_row)
    got = v2.apply(x.clone(), ctx(slots))
    assert torch.equal(torch.isinf(got), torch.isinf(want)), per_row
    torch.testing.assert_close(got[torch.isfinite(got)], want[torch.isfinite(want)])


def test_v2_slots_staged_writes_and_row_mapping():
    v2 = TopHV2(None, SimpleNamespace(device=torch.device("cpu"), max_num_reqs=8))
    assert v2.add_request(5, params(0.4, 1.5)) is True
    assert v2.add_request(2, params(None, 1.0)) is False
    assert v2.add_request(3, params(0.5, 0.0)) is False  # greedy: the argmax survives anyway
    assert v2.add_request(7, params(0.7, 0.8)) is True
    x = logits(3, 9)
    # Staged, not yet written: the device-side tensors still say "off" for every slot.
    torch.testing.assert_close(v2.apply(x.clone(), ctx([7, 2, 5])), x)
    v2.apply_staged_writes()
    check_v2(v2, [7, 2, 5], [(0.7, 0.8), None, (0.4, 1.5)], 10)
    check_v2(v2, [5, 3, 7, 2], [(0.4, 1.5), None, (0.7, 0.8), None], 11)  # another batch order
    # Slot 5 is recycled for a plain request: all of the old occupant's state must go.
    assert v2.add_request(5, params(None, 1.2)) is False
    v2.apply_staged_writes()
    check_v2(v2, [5, 7], [None, (0.7, 0.8)], 12)
    x = logits(2, 13)
    assert v2.apply(x, ctx([5, 2])) is x  # no active slot in this batch: returns at once
