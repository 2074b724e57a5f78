import pytest
import torch

from kernels.sparse24.format import (compress_24, compressed_nbytes, count_24_violations,
                                     decompress_24, is_24, unpack_positions)


def random_24(n, k, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    drop = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    keep = torch.ones(n, k // 4, 4, dtype=torch.bool).scatter_(-1, drop, False)
    return (w * keep.reshape(n, k)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(1, 4), (7, 16), (33, 200), (64, 64)])
def test_round_trip(n, k, dtype):
    w = random_24(n, k, dtype)
    values, meta = compress_24(w)
    assert values.shape == (n, k // 2) and values.dtype == dtype
    assert meta.shape == (n, -(-k // 16)) and meta.dtype == torch.int16
    assert torch.equal(decompress_24(values, meta), w)


def test_all_position_pairs_and_sign_bit():
    # the 6 possible pairs; (2,3) in the 4th group of a word sets the int16 sign bit
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (1, 3), (2, 3)]
    w = torch.zeros(1, 4 * len(pairs))
    for g, (a, b) in enumerate(pairs):
        w[0, 4 * g + a], w[0, 4 * g + b] = g + 1.0, -(g + 1.0)
    values, meta = compress_24(w)
    assert (meta < 0).any()
    assert unpack_positions(meta, w.shape[1])[0].tolist() == [list(p) for p in pairs]
    assert torch.equal(decompress_24(values, meta), w)


def test_known_layout():
    # group 0 keeps columns 1 and 3 -> nibble 1 | 3 << 2 = 13; group 1 keeps 0 and 2 -> 8 << 4
    w = torch.tensor([[0.0, 5.0, 0.0, 6.0, 7.0, 0.0, 8.0, 0.0]])
    values, meta = compress_24(w)
    assert values.tolist() == [[5.0, 6.0, 7.0, 8.0]]
    assert meta.tolist() == [[13 | (8 << 4)]]


def test_groups_with_fewer_than_two_nonzeros_are_deterministic():
    w = torch.tensor([[0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0]])
    values, meta = compress_24(w)
    pos = unpack_positions(meta, 12)[0].tolist()
    assert pos == [[0, 3], [0, 1], [0, 1]]  # nonzeros kept, then the lowest free positions
    assert values.tolist() == [[0.0, 3.0, 0.0, 0.0, 0.0, 2.0]]
    assert torch.equal(decompress_24(values, meta), w)
    v2, m2 = compress_24(w.clone())
    assert torch.equal(v2, values) and torch.equal(m2, meta)


def test_rejects_non_24_with_count():
    w = random_24(4, 32)
    w[0, 0:4] = 1.0  # one group with 4 nonzeros
    w[3, 8:11] = 1.0  # one with at least 3
    assert count_24_violations(w) == 2 and not is_24(w)
    with pytest.raises(ValueError, match=r"2 of 32 groups"):
        compress_24(w)


def test_rejects_k_not_multiple_of_4():
    with pytest.raises(ValueError, match="multiple of 4"):
        compress_24(torch.zeros(3, 10))
    assert not is_24(torch.zeros(3, 10))


def test_meta_shape_mismatch():
    values, meta = compress_24(random_24(4, 32))
    with pytest.raises(ValueError, match="meta shape"):
        decompress_24(values, meta[:, :1])


def test_compressed_nbytes():
    assert compressed_nbytes(4096, 4096) == 4096 * 2048 * 2 + 4096 * 256 * 2
    assert compressed_nbytes(4096, 4096) / (4096 * 4096 * 2) == 0.5625
