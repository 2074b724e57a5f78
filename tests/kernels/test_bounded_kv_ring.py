"""The bounded ring's cache operations on vLLM's real CPU kernels (no engine): the probed K/V layout,
batched compaction in the kernel's layout against kernels/retention/reference.compact_reference, and
the stock attention kernel over a compacted ring against plain softmax attention."""
import pytest
import torch

vops = pytest.importorskip("vllm._custom_ops")

from kernels.retention.reference import compact_reference  # noqa: E402
from kernels.vllm_plugin.bounded_kv.backend import compact_rings  # noqa: E402
from kernels.vllm_plugin.bounded_kv.layout import cache_maps  # noqa: E402


class MD:
    def __init__(self, isa, c, d, dtype):
        self.k_inv, self.v_inv = cache_maps(isa, c, d, dtype)


def read_plain(cache, inv, c, d):
    nb, h = cache.shape[:2]
    return cache.flatten(2)[:, :, inv].view(nb, h, c, d)


@pytest.mark.parametrize("isa,c,d", [("vec", 96, 64), ("vec16", 40, 64), ("vec", 64, 128)])
def test_layout_probe_round_trips_what_the_kernel_wrote(isa, c, d):
    nb, h = 3, 2
    kv = torch.zeros(nb, h, c, 2 * d)
    kc, vc = kv.view(nb, h, 2 * c, d).chunk(2, dim=2)
    key, val = torch.randn(nb * c, h, d), torch.randn(nb * c, h, d)
    vops.cpu_attn_reshape_and_cache(key, val, kc, vc, torch.arange(nb * c), isa)
    md = MD(isa, c, d, torch.float32)
    assert torch.equal(read_plain(kc, md.k_inv, c, d), key.view(nb, c, h, d).transpose(1, 2))
    assert torch.equal(read_plain(vc, md.v_inv, c, d), val.view(nb, c, h, d).transpose(1, 2))


def test_compaction_in_the_kernel_layout_equals_the_reference():
    isa, nb, h, c, d, m, sinks = "vec", 5, 3, 96, 64, 64, 4
    g = torch.Generator().manual_seed(0)
    kv = torch.zeros(nb, h, c, 2 * d)
    kc, vc = kv.view(nb, h, 2 * c, d).chunk(2, dim=2)
    key, val = torch.randn(nb * c, h, d, generator=g), torch.randn(nb * c, h, d, generator=g)
    vops.cpu_attn_reshape_and_cache(key, val, kc, vc, torch.arange(nb * c), isa)
    pos = (torch.arange(c, dtype=torch.int32) + 7).expand(nb, h, c).contiguous()
    pos[:, :, :4] = torch.arange(4, dtype=torch.int32)  # sinks stay
    lb = -torch.rand(nb, h, c, generator=g) * 0.05
    rings = torch.tensor([1, 3, 4])
    t = torch.tensor([200, 150, 300])
    md = MD(isa, c, d, torch.float32)
    k0, v0 = read_plain(kc, md.k_inv, c, d)[rings].clone(), read_plain(vc, md.v_inv, c, d)[rings].clone()
    want = compact_reference(k0, v0, pos[rings].clone(), lb[rings].clone(), torch.full((3,), c), t, m, sinks)
    untouched = read_plain(kc, md.k_inv, c, d)[[0, 2]].clone()
    compact_rings(kc, vc, pos, lb, rings, t, m, sinks, md, isa)
    k1, v1 = read_plain(kc, md.k_inv, c, d)[rings], read_plain(vc, md.v_inv, c, d)[rings]
    assert torch.equal(k1[:, :, :m], want[0][:, :, :m]) and torch.equal(v1[:, :, :m], want[1][:, :, :m])
    assert torch.equal(pos[rings][:, :, :m], want[2][:, :, :m]) and torch.equal(lb[rings][:, :, :m], want[3][:, :, :m])
    assert torch.equal(read_plain(kc, md.k_inv, c, d)[[0, 2]], untouched)
    assert bool((pos[rings][:, :, :4] == torch.arange(4, dtype=torch.int32)).all())

    # The stock attention kernel over the compacted rings (M valid slots + 1 new token) = plain softmax.
    hq = 9
    q = torch.randn(3, hq, d, generator=g)
    newk, newv = torch.randn(3, h, d, generator=g), torch.randn(3, h, d, generator=g)
    vops.cpu_attn_reshape_and_cache(newk, newv, kc, vc, rings * c + m, isa)
    seq = torch.full((3,), m + 1, dtype=torch.int32)
    qsl = torch.arange(4, dtype=torch.int32)
    sm = vops.cpu_attn_get_scheduler_metadata(num_reqs=3, num_heads=hq, num_kv_heads=h, head_dim=d, seq_lens=seq,
                                              dtype=torch.float32, query_start_loc=qsl, causal=True,
                                              sliding_window_size=-1, isa=isa, enable_kv_split=False)
    out = torch.empty_like(q)
    vops.cpu_attention_with_kv_cache(query=q, key_cache=kc, value_cache=vc, output=out, query_start_loc=qsl,
                                     seq_lens=seq, scale=d ** -0.5, causal=True, alibi_slopes=None, sliding_window=-1,
                                     block_table=rings.to(torch.int32).view(-1, 1), softcap=0,
                                     scheduler_metadata=sm, s_aux=None)
    kk = torch.cat([want[0][:, :, :m], newk[:, :, None]], 2).repeat_interleave(hq // h, 1)
    vv = torch.cat([want[1][:, :, :m], newv[:, :, None]], 2).repeat_interleave(hq // h, 1)
    ref = torch.softmax((q[:, :, None] @ kk.transpose(-1, -2)) * d ** -0.5, -1) @ vv
    torch.testing.assert_close(out, ref[:, :, 0], rtol=1e-5, atol=1e-5)
