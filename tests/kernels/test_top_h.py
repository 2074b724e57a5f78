"""Top-H: the reference on hand-computed cases and properties, the CPU path and the Triton
kernel (TRITON_INTERPRET=1, small sizes) against the reference."""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (also in conftest)

import pytest
import torch

from kernels.top_h import top_h_filter, top_h_filter_, top_h_keep_mask
from kernels.top_h.authors import top_h_keep_mask_authors
from kernels.top_h.reference import top_h_keep_row

# The interpreter evaluates both sides of tl.where with numpy (0 * -inf, log 0): harmless.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

LN2 = math.log(2.0)
NEG_INF = float("-inf")

# Hand example. p = (1/8, 1/2, 1/8, 1/4) at indices 0..3, i.e. logits = log2(8p) * ln 2.
# In bits: H(p) = 1/2*1 + 1/4*2 + 2 * 1/8*3 = 1.75.
# Visiting order (stable): index 1 (1/2), 3 (1/4), 0 (1/8), 2 (1/8).
#   k=1: H_1 = 0                                          ratio 0
#   k=2: {1/2, 1/4} / (3/4) = {2/3, 1/3}: H = log2 3 - 2/3 = 0.9183     ratio 0.5248
#   k=3: {4/7, 2/7, 1/7}: H = log2 7 - 10/7 = 1.3788                     ratio 0.7879
#   k=4: H = 1.75                                                        ratio 1
HAND_LOGITS = torch.tensor([[1.0, 3.0, 1.0, 2.0]]) * LN2
HAND_CASES = [(0.4, [1]), (0.52, [1]), (0.53, [1, 3]), (0.78, [1, 3]), (0.79, [0, 1, 3]),
              (0.99, [0, 1, 3]), (1.0, [0, 1, 2, 3])]


def kept(mask_row):
    return sorted(torch.nonzero(mask_row).flatten().tolist())


def entropy(p):
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def random_logits(b, v, seed, scale=3.0, neg_inf_frac=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, v, generator=g) * scale
    if neg_inf_frac:
        x[torch.rand(b, v, generator=g) < neg_inf_frac] = NEG_INF
    return x


# ---------------------------------------------------------------- reference

@pytest.mark.parametrize("alpha,expected", HAND_CASES)
def test_reference_hand_example(alpha, expected):
    assert kept(top_h_keep_mask(HAND_LOGITS, alpha)[0]) == expected


def test_reference_hand_example_temperature():
    # T scales the logits inside the rule only: 2x logits at T=2 is the same distribution.
    for alpha, expected in HAND_CASES:
        assert kept(top_h_keep_mask(HAND_LOGITS * 2, alpha, temperature=2.0)[0]) == expected
    # T=0.5 squares p: (1, 16, 1, 4)/22, H = 0.8226 nats; prefix {16, 4}/20: H = 0.5004
    # (ratio 0.608); prefix {16, 4, 1}/21: H = 0.6681 (ratio 0.812 > 0.79): keep 2, not 3.
    sharp = top_h_keep_mask(HAND_LOGITS, 0.79, temperature=0.5)[0]
    assert kept(sharp) == [1, 3]


@pytest.mark.parametrize("seed", range(4))
def test_reference_properties(seed):
    x = random_logits(1, 500, seed, scale=1.0 + seed)[0]
    x[::37] = NEG_INF
    p = torch.softmax(x.double(), 0)
    h = entropy(p)
    order = torch.sort(p, descending=True, stable=True).indices
    n_pos = int((p > 0).sum())
    sizes = []
    for alpha in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95):
        keep = top_h_keep_row(x, alpha)
        n = int(keep.sum())
        sizes.append(n)
        assert keep[order[:n]].all() and not keep[order[n:]].any()  # a prefix of the order
        assert keep[order[0]]  # top token
        assert not keep[torch.isneginf(x)].any()
        assert entropy(p[order[:n]]) <= alpha * h + 1e-12  # the bound holds ...
        if n < n_pos:  # ... and one more token would break it
            assert entropy(p[order[:n + 1]]) > alpha * h
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]  # non-decreasing in alpha
    assert top_h_keep_row(x, 1.0).all()


def test_reference_neg_inf():
    x = torch.tensor([[NEG_INF, 0.5, NEG_INF, NEG_INF],
                      [NEG_INF, NEG_INF, NEG_INF, NEG_INF],
                      [2.0, NEG_INF, 2.0, NEG_INF]])
    keep = top_h_keep_mask(x, 0.4)
    assert kept(keep[0]) == [1]  # the only finite token
    assert keep[1].all()  # an all -inf row is left as it is
    assert kept(keep[2]) == [0]  # a tie at the top: H_2 = log 2 > 0.4 log 2, keep the first
    assert kept(top_h_keep_mask(x[2:], 1.0)[0]) == [0, 1, 2, 3]  # alpha = 1: unchanged


def test_reference_temperature_changes_the_set():
    x = random_logits(1, 400, 7, scale=2.0)
    cold = int(top_h_keep_mask(x, 0.4, temperature=0.5).sum())
    hot = int(top_h_keep_mask(x, 0.4, temperature=2.0).sum())
    same = top_h_keep_mask(x * 2.0, 0.4, temperature=2.0)
    assert torch.equal(same, top_h_keep_mask(x, 0.4))
    assert cold != hot


def test_authors_rule_hand_example():
    # Unnormalised partial entropy of the raw top probabilities, in bits:
    # E = (0.5, 1.0, 1.375, 1.75); stop once E_k > alpha * 1.75.
    for alpha, expected in ((0.4, [1]), (0.6, [1, 3]), (0.8, [0, 1, 3]), (1.0, [0, 1, 2, 3])):
        assert kept(top_h_keep_mask_authors(HAND_LOGITS, alpha)[0]) == expected
    x = random_logits(2, 3000, 3, scale=0.1)  # flat: the paper rule keeps > 100 tokens
    assert int(top_h_keep_mask_authors(x, 0.9).sum(1).max()) <= 100
    assert int(top_h_keep_mask(x, 0.9).sum(1).min()) > 100


# ---------------------------------------------------------------- CPU path

def test_cpu_path_equals_reference():
    x = random_logits(12, 777, 11, scale=2.5, neg_inf_frac=0.05)
    x[3] = torch.round(x[3])  # ties: the CPU path splits them exactly as the reference
    x[4] = NEG_INF
    x[5, 100:] = NEG_INF
    alpha = torch.linspace(0.05, 1.0, 12)
    temp = torch.tensor([1.0, 0.7, 1.5, 1.0, 1.0, 2.0, 0.0, 1.0, 0.3, 1.0, 1.2, 1.0])
    for t in (None, temp):
        ref = top_h_keep_mask(x, alpha, temperature=t)
        out = top_h_filter(x, alpha, temperature=t)
        assert torch.equal(~torch.isneginf(out) | torch.isneginf(x), ref | torch.isneginf(x))
        assert torch.equal(out[ref], x[ref])  # kept logits are untouched (not scaled by T)
        assert torch.isneginf(out[~ref]).all()


def test_cpu_path_escalates_past_the_first_candidates():
    # V > 1024: rows solved from the top 32, from the top 1024 and only by the full sort, mixed with
    # rows left alone (alpha = 1, all -inf) in one batch; bf16 input.
    x = torch.cat([random_logits(4, 3000, 21, scale=4.0),    # peaked: small kept sets
                   random_logits(4, 3000, 22, scale=0.05),   # flat: kept sets of hundreds or more
                   random_logits(2, 3000, 23, scale=1.0)])
    x[8] = NEG_INF
    alpha = torch.tensor([0.1, 0.4, 0.7, 0.95, 0.2, 0.5, 0.8, 0.99, 0.4, 1.0])
    sizes = top_h_keep_mask(x, alpha).sum(1)
    assert ((sizes < 32).any() and ((sizes > 32) & (sizes < 1024)).any()  # every stage runs
            and (sizes[:8] > 1024).any())
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        ref = top_h_keep_mask(xd, alpha)
        out = top_h_filter(xd, alpha)
        assert torch.equal(~torch.isneginf(out) | torch.isneginf(xd), ref | torch.isneginf(xd)), dtype
        assert torch.equal(out[ref & ~torch.isneginf(xd)], xd[ref & ~torch.isneginf(xd)])


@pytest.mark.parametrize("v,scale", [(8192, 3.0), (4096, 0.3), (49152, 2.0)])
def test_cpu_topk_by_blocks_equals_topk(v, scale):
    from kernels.top_h.ops import _topk
    x = random_logits(5, v, v, scale=scale)
    x[1] = torch.round(x[1])  # many ties, also among the block maxima
    x[2, : v // 2] = NEG_INF
    vals, idx = _topk(x, 32)
    ref_vals, _ = torch.topk(x, 32, dim=-1)
    assert torch.equal(vals, ref_vals)
    assert torch.equal(x.gather(1, idx), vals) and all(len(set(r.tolist())) == 32 for r in idx)


def test_cpu_path_block_candidates_with_ties():
    x = random_logits(6, 8192, 31, scale=2.0)
    x[0] = torch.round(x[0] * 2) / 2  # ties inside and across the candidate boundary
    x[1, :] = 0.0
    x[1, 100:104] = 5.0
    alpha = torch.tensor([0.3, 0.4, 0.6, 0.9, 0.2, 0.5])
    ref = top_h_keep_mask(x, alpha)
    out = top_h_filter(x, alpha)
    assert torch.equal(~torch.isneginf(out), ref)


def test_cpu_path_in_place_and_scalar_alpha():
    x = random_logits(3, 300, 5)
    y = x.clone()
    out = top_h_filter_(y, 0.4)
    assert out.data_ptr() == y.data_ptr()
    assert torch.equal(out, top_h_filter(x, torch.full((3,), 0.4)))
    assert not torch.equal(y, x)
    assert torch.equal(top_h_filter(x, 1.0), x)  # alpha = 1 keeps everything


# ---------------------------------------------------------------- Triton (interpreted)

def triton_keep(x, alpha, temperature=None, **config):
    from kernels.top_h.ops import _inverse_temperature, _per_row
    from kernels.top_h.triton_top_h import top_h_triton_
    b = x.shape[0]
    y = x.clone()
    inv_t = None if temperature is None else _inverse_temperature(temperature, b, x.device)
    top_h_triton_(y, _per_row(alpha, b, x.device), inv_t, **config)
    keep = ~torch.isneginf(y)
    assert torch.equal(y[keep], x[keep])  # kept values are untouched
    return keep | torch.isneginf(x)  # -inf inputs stay -inf either way: compare the rest


def assert_same_up_to_boundary_tie(keep, ref, x):
    """keep == ref except on the tie group at the reference's threshold, which the kernel
    keeps or drops whole (it cannot split equal logits); a whole group must match."""
    ref = ref | torch.isneginf(x)
    for i in range(x.shape[0]):
        finite = ~torch.isneginf(x[i])
        if not finite.any() or ref[i].all():
            assert torch.equal(keep[i], ref[i]), i
            continue
        v = x[i][ref[i] & finite].min()
        group = x[i] == v
        assert torch.equal(keep[i][~group], ref[i][~group]), (i, int(keep[i].sum()), int(ref[i].sum()))
        if ref[i][group].all():
            assert keep[i][group].all(), i
        else:
            assert keep[i][group].all() or not keep[i][group].any(), i


@pytest.mark.parametrize("v,b,seed", [(1000, 6, 0), (4097, 3, 1), (37, 4, 2)])
def test_triton_random(v, b, seed):
    x = random_logits(b, v, seed, scale=2.0 + seed, neg_inf_frac=0.02)
    alpha = torch.rand(b, generator=torch.Generator().manual_seed(seed)) * 0.85 + 0.05
    ref = top_h_keep_mask(x, alpha)
    assert torch.equal(triton_keep(x, alpha), ref | torch.isneginf(x))


@pytest.mark.parametrize("radix,block", [(3, 256), (5, 128)])
def test_triton_other_configs(radix, block):
    x = random_logits(3, 700, 9, scale=2.0, neg_inf_frac=0.05)
    alpha = torch.tensor([0.2, 0.5, 0.8])
    keep = triton_keep(x, alpha, RADIX=radix, BLOCK=block, num_warps=4)
    assert torch.equal(keep, top_h_keep_mask(x, alpha) | torch.isneginf(x))


@pytest.mark.parametrize("radix", [2, 3, 4])
def test_triton_adjacent_floats(radix):
    # 600 consecutive fp32 values (1 ulp apart) around the threshold: no early exit, the
    # radix select must resolve the last bit.
    g = torch.Generator().manual_seed(radix)
    x = (1.0 + torch.arange(600, dtype=torch.float64) * 2.0 ** -23).float()[None, :]
    x = torch.cat([x[:, torch.randperm(600, generator=g)], x * 0 - 3.0], 1)
    x = x.repeat(2, 1)
    x[1, ::7] -= 2.0 ** -22
    alpha = torch.tensor([0.5, 0.8])
    keep = triton_keep(x, alpha, RADIX=radix, BLOCK=256, num_warps=4)
    ref = top_h_keep_mask(x, alpha)
    assert 1 < int(ref[0].sum()) < 600
    assert_same_up_to_boundary_tie(keep, ref, x)


def test_triton_temperature_and_negative_logits():
    x = random_logits(4, 1000, 3, scale=1.5) - 40.0  # all negative: keys below the sign bit
    alpha = torch.tensor([0.3, 0.5, 0.7, 0.9])
    temp = torch.tensor([0.6, 1.0, 1.7, 0.0])
    ref = top_h_keep_mask(x, alpha, temperature=temp)
    assert torch.equal(triton_keep(x, alpha, temp), ref)


def test_triton_ties():
    x = torch.round(random_logits(4, 1000, 4, scale=2.0))  # integers: big tie groups
    # Row 1: a group of 40 zeros, half -0.0 and half +0.0, below 3 tokens at 1.0; alpha is
    # chosen so that the reference keeps 25-39 of the zeros: a kernel that told -0.0 from
    # +0.0 would keep the 20 +0.0 alone.
    x[1] = -6.0
    x[1, 100:140] = torch.tensor([-0.0, 0.0]).repeat(20)
    x[1, 500:503] = 1.0
    split = [a / 200 for a in range(10, 200)
             if 25 <= int(top_h_keep_row(x[1], a / 200)[100:140].sum()) < 40]
    assert split, "no alpha splits the zero group"
    x[2] = 0.0  # all equal: the whole row is one group at the top
    x[3, :10] = 9.0  # a tie at the top that alone breaks the bound at alpha 0.1
    alpha = torch.tensor([0.4, split[len(split) // 2], 0.3, 0.1])
    ref = top_h_keep_mask(x, alpha)
    keep = triton_keep(x, alpha)
    assert_same_up_to_boundary_tie(keep, ref, x)
    assert keep[2].all() and keep[3, :10].all() and not keep[3, 10:].any()


def test_triton_bf16():
    x = random_logits(3, 1000, 5, scale=3.0).to(torch.bfloat16)  # coarse values: ties likely
    alpha = torch.tensor([0.2, 0.4, 0.8])
    ref = top_h_keep_mask(x, alpha)
    keep = triton_keep(x, alpha)
    assert_same_up_to_boundary_tie(keep, ref, x)


def test_triton_special_rows():
    x = random_logits(4, 600, 6)
    x[1] = NEG_INF  # all -inf: untouched
    x[2, 1:] = NEG_INF  # one finite token
    x[3, 5] = 200.0  # everything else has probability < e^-180 (0 in fp32)
    alpha = torch.tensor([1.0, 0.4, 0.4, 0.9])
    keep = triton_keep(x, alpha)
    assert keep[0].all() and keep[1].all()
    assert kept(keep[2] & ~torch.isneginf(x[2])) == [0]
    assert kept(keep[3]) == [5]


def test_triton_tests_can_fail():
    # The comparison is not vacuous: a different alpha gives a different kept set.
    x = random_logits(2, 1000, 8)
    assert not torch.equal(triton_keep(x, 0.3), top_h_keep_mask(x, 0.5))


def test_bench_compare_authors_smoke(tmp_path, capsys):
    from kernels.top_h import bench
    x = random_logits(5, 2000, 12, scale=2.5)
    path = tmp_path / "logits.pt"
    torch.save(x, path)
    out = tmp_path / "cmp.json"
    bench.main(["--compare-authors", "--logits", str(path), "--alpha", "0.4", "--out", str(out)])
    rows = __import__("json").loads(out.read_text())["compare_authors"]
    assert rows[0]["rows"] == 5 and rows[0]["authors_kept_max"] <= 100
    assert rows[0]["paper_kept_mean"] == float(top_h_keep_mask(x, 0.4).sum(1).float().mean())


COMPILE_SM90 = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.top_h import triton_top_h as m
sig = {"x_ptr": "*bf16", "stride_row": "i64", "V": "i32", "alpha_ptr": "*fp32",
       "inv_t_ptr": "*fp32", "HAS_T": "constexpr", "RADIX": "constexpr", "BLOCK": "constexpr"}
cfg = m._configs()[1]
src = ASTSource(m._top_h_kernel.fn, sig, constexprs={"HAS_T": True, **cfg.kwargs})
triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
print("compiled")
"""


def test_triton_kernel_compiles_for_sm90():
    # The interpreter accepts code the compiler rejects (e.g. a loop-carried variable that
    # changes type): compile for Hopper, no GPU needed, in a fresh process.
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", COMPILE_SM90], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    if "compiled" not in r.stdout and ("ptxas" in r.stderr and "not found" in r.stderr
                                       or "No module named 'triton.backends.nvidia'" in r.stderr):
        pytest.skip("no CUDA backend in this triton build")
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
