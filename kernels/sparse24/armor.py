"""ARMOR (Liu et al., arXiv 2510.05528): W ~ A . (W' * M) . B, a 2:4 sparse core between block-diagonal wrappers.

Per linear layer, as the authors' code (src/ARMOR_compress.py) runs it:

* Normalise W by its column L2 norms c, then by the row norms r of the result: W_bar = W / (r c^T).
* Proxy loss (NoWag): L = sum_ij (W_bar_ij - W_hat_ij)^2 h_j / sum_ij W_bar_ij^2 h_j, with h_j = ||X_j||^2 from
  calibration inputs and W_hat = A (W' * M) B; A [d_out/b, b, b] and B [d_in/b, b, b] are block-diagonal, start as
  the identity. The loss separates into b x b blocks (I, J): W_hat_IJ = A_I C_IJ B_J.
* Initial mask (NoWag-P): top 2 of every group of 4 by W_bar^2 h.
* Each iteration: one Adam step (lr 1e-4) on A, B and W' jointly, then a discrete step: in every block one group of
  4 (one row, 4 consecutive columns) is drawn with probability proportional to the L1 norm of dL/dC over it, all 6
  masks of the group are tried with their closed-form least-squares values, the best is kept. Early stop when the
  loss has not improved for `patience` iterations.
* At the end r is folded into A and c into B, so y = x W_hat^T = ((x B^T) C^T) A^T with C = W' * M stored as an
  ordinary 2:4 weight.

One addition: the best state seen is what is returned (the authors keep the last), so the loss of the result is
never above the NoWag-P initialisation even if an Adam step overshoots.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .prune import mask_24

EPS = 1e-8  # as the authors' code: keeps norms and ||a||^2 away from 0
_PAIRS = torch.tensor(list(itertools.combinations(range(4), 2)))  # the 6 masks of a group, [6, 2]


# ----------------------------------------------------------------------------- block-diagonal algebra

def bd_left(blocks: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """blockdiag(blocks) @ m, blocks [n, b, b], m [n*b, k]."""
    n, b, _ = blocks.shape
    return torch.bmm(blocks, m.reshape(n, b, -1)).reshape(m.shape)


def bd_right(m: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """m @ blockdiag(blocks), m [k, n*b]."""
    n, b, _ = blocks.shape
    return torch.einsum("knq,nqp->knp", m.reshape(-1, n, b), blocks).reshape(m.shape)


def bd_apply(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x @ blockdiag(blocks)^T for activations x [..., n*b]: each block of b features through its own b x b."""
    n, b, _ = blocks.shape
    return torch.einsum("tnq,npq->tnp", x.reshape(-1, n, b), blocks).reshape(x.shape)


def armor_weight(a: torch.Tensor, core: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The dense weight A . C . B that an ARMOR layer computes with."""
    return bd_left(a, bd_right(core, b))


def armor_linear(x: torch.Tensor, a: torch.Tensor, core: torch.Tensor, b: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x (A C B)^T + bias, computed as B first, the 2:4 core, then A (never forming A C B)."""
    y = bd_apply(torch.nn.functional.linear(bd_apply(x, b), core), a)
    return y if bias is None else y + bias


def added_params(d_out: int, d_in: int, block: int) -> int:
    return block * (d_out + d_in)


def check_block(block: int, *dims: int) -> None:
    if block < 4 or block % 4:
        raise ValueError(f"ARMOR block size must be a positive multiple of 4, got {block}")
    bad = [d for d in dims if d % block]
    if bad:
        raise ValueError(f"ARMOR block size {block} does not divide the layer dimension(s) {bad}")


def auto_block(dims: list[tuple[int, int]], max_added: float = 0.05) -> int:
    """The largest block size (a multiple of 4 dividing every dimension) whose wrappers add at most `max_added` of
    the dense parameters of these (d_out, d_in) layers; 128, the authors' size for 7-13B models, at most."""
    dense = sum(o * i for o, i in dims)
    best = 0
    for blk in range(4, 129, 4):
        if all(o % blk == 0 and i % blk == 0 for o, i in dims) and \
                sum(added_params(o, i, blk) for o, i in dims) <= max_added * dense:
            best = blk
    if not best:
        raise ValueError(f"no ARMOR block size divides all layer dimensions {sorted(set(dims))} within "
                         f"{max_added:.0%} added parameters; pass --block-size")
    return best


# ----------------------------------------------------------------------------- the per-layer problem

@dataclass
class ArmorProblem:
    """Normalised weight, importance and the current factors of one layer (all float32)."""
    w_bar: torch.Tensor  # [d_out, d_in]
    h: torch.Tensor  # [d_in], ||X_j||^2 (any positive scale)
    row: torch.Tensor  # r [d_out]
    col: torch.Tensor  # c [d_in]
    a: torch.Tensor  # [d_out/b, b, b]
    values: torch.Tensor  # W' [d_out, d_in] (only its kept entries matter)
    mask: torch.Tensor  # M [d_out, d_in] bool, 2:4
    b: torch.Tensor  # [d_in/b, b, b]
    scale: float  # sum W_bar^2 h: the loss of W_hat = 0

    @property
    def core(self) -> torch.Tensor:
        return self.values * self.mask

    def residual(self) -> torch.Tensor:
        return armor_weight(self.a, self.core, self.b) - self.w_bar

    def loss(self, resid: torch.Tensor) -> float:
        """The proxy loss of a residual E = A C B - W_bar."""
        return float((resid.square() * self.h).sum() / self.scale)


def init_problem(w: torch.Tensor, h: torch.Tensor, block: int) -> ArmorProblem:
    """NoWag-P initialisation: normalise, mask by W_bar^2 h, A = B = I."""
    w = w.detach().float()
    d_out, d_in = w.shape
    check_block(block, d_out, d_in)
    h = h.detach().float().clone()
    ok = torch.isfinite(h) & (h > 0)
    # Dead inputs (never active in calibration) get the mean importance, as the authors' code does.
    h[~ok] = h[ok].mean() if ok.any() else 1.0
    col = w.norm(dim=0) + EPS
    w1 = w / col
    row = w1.norm(dim=1) + EPS
    w_bar = w1 / row[:, None]
    mask = mask_24(w_bar.square() * h)
    eye_a = torch.eye(block).expand(d_out // block, block, block).clone()
    eye_b = torch.eye(block).expand(d_in // block, block, block).clone()
    scale = float((w_bar.square() * h).sum())
    return ArmorProblem(w_bar, h, row, col, eye_a, w_bar.clone(), mask, eye_b, max(scale, 1e-30))


def _blocks(m: torch.Tensor, n0: int, n1: int, blk: int) -> torch.Tensor:
    """[n0*blk, n1*blk] -> [n0, n1, blk, blk] (block (I, J) at [I, J])."""
    return m.reshape(n0, blk, n1, blk).transpose(1, 2)


def gradients(p: ArmorProblem, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dA, dL/dC, dL/dB) at the current factors, given their residual E = A C B - W_bar (no autograd: the three
    products are cheaper written out)."""
    blk = p.a.shape[1]
    d_out, d_in = p.w_bar.shape
    n0, n1 = d_out // blk, d_in // blk
    r = resid * (p.h * (2.0 / p.scale))
    core = p.core
    g_core = bd_left(p.a.transpose(1, 2), bd_right(r, p.b.transpose(1, 2)))
    cb = bd_right(core, p.b)
    g_a = torch.bmm(r.reshape(n0, blk, d_in), cb.reshape(n0, blk, d_in).transpose(1, 2))
    ac = bd_left(p.a, core)
    g_b = torch.einsum("knp,knq->npq", ac.reshape(d_out, n1, blk), r.reshape(d_out, n1, blk))
    return g_a, g_core, g_b


@torch.no_grad()
def discrete_step(p: ArmorProblem, resid: torch.Tensor, grad_core: torch.Tensor,
                  generator: torch.Generator | None = None) -> int:
    """One ARMOR sparse-core step on every block at once, given the residual E = A C B - W_bar (updated in place for
    the blocks that change) and dL/dC (which picks the groups); returns how many blocks changed.

    For the drawn group (row i = I b + rho, columns J b + 4 gamma + 0..3) with the group's current entries removed
    from the residual (E0, weighted by sqrt(h) on columns), the new values v on support S minimise
    ||E0_w + a v_S^T B_S||^2 with a = A_I[:, rho] and B_S the rows of B_J (weighted) picked by S:
    v_S = -(B_S B_S^T)^-1 f_S / ||a||^2, f = B_g E0_w^T a, and the block's loss falls by f_S^T (B_S B_S^T)^-1 f_S / ||a||^2.
    The current support is one of the six, so the best never raises the block's loss; a block changes only where
    its exact new loss is not above the old one (guards rounding when B_S B_S^T is near singular).
    """
    blk = p.a.shape[1]
    d_out, d_in = p.w_bar.shape
    n0, n1, gpb = d_out // blk, d_in // blk, blk // 4
    nblk = n0 * n1
    gnorm = _blocks(grad_core, n0, n1, blk).reshape(n0, n1, blk, gpb, 4).abs().sum(-1).reshape(nblk, blk * gpb)
    # One draw per block, probability ~ gnorm (inverse CDF: torch.multinomial spends more on its exponentials).
    cdf = gnorm.cumsum(1)
    u = torch.rand(nblk, 1, generator=generator) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u).squeeze(1).clamp_(max=blk * gpb - 1)
    zero = cdf[:, -1] <= 0  # an all-zero block: a uniform draw
    if zero.any():
        pick[zero] = torch.randint(blk * gpb, (int(zero.sum()),), generator=generator)
    bi = torch.arange(nblk)
    I, J = bi // n1, bi % n1
    rho, gamma = pick // gpb, pick % gpb
    rows = I * blk + rho  # global row of each block's group
    cols = J[:, None] * blk + 4 * gamma[:, None] + torch.arange(4)  # [nblk, 4] global columns
    sq_h = p.h.sqrt().reshape(n1, blk)[J][:, None, :]  # [nblk, 1, b]: sqrt(h) of block J's columns

    a_vec = p.a[I, :, rho]  # [nblk, b]: column rho of A_I
    b_rows = p.b[J[:, None], (4 * gamma)[:, None] + torch.arange(4), :]  # [nblk, 4, b]: rows of B_J
    bw = b_rows * sq_h  # weighted
    c_old = p.core[rows[:, None], cols]  # [nblk, 4]
    e4 = resid.view(n0, blk, n1, blk)
    # E_w^T a per block, [nblk, b] (the only full-size pass); then everything is O(b) per block:
    # f = B_g E0_w^T a with E0_w = E_w - a c_old^T B_g, i.e. f = B_g E_w^T a - ||a||^2 G c_old, G = B_g B_g^T.
    eta = (e4[I, :, J, :] * a_vec[:, :, None]).sum(1) * sq_h[:, 0, :]
    a2 = a_vec.square().sum(1)  # [nblk]
    gram = bw @ bw.transpose(1, 2)  # [nblk, 4, 4]
    f_cur = (bw * eta[:, None, :]).sum(-1)  # B_g E_w^T a
    f = f_cur - a2[:, None] * (gram @ c_old[:, :, None]).squeeze(2)

    i0, i1 = _PAIRS[:, 0], _PAIRS[:, 1]
    g00 = gram[:, i0, i0] + 1e-9  # the six 2 x 2 systems, solved in closed form
    g11 = gram[:, i1, i1] + 1e-9
    g01 = gram[:, i0, i1]
    f0, f1 = f[:, i0], f[:, i1]
    det = g00 * g11 - g01 * g01
    s0 = (g11 * f0 - g01 * f1) / det
    s1 = (g00 * f1 - g01 * f0) / det  # (s0, s1) = G_S^-1 f_S, [nblk, 6]
    gain = (f0 * s0 + f1 * s1) / (a2[:, None] + EPS)  # loss decrease per support
    gain = torch.where(torch.isfinite(gain), gain, torch.full_like(gain, -math.inf))
    best = gain.argmax(1)
    v = -torch.stack([s0[bi, best], s1[bi, best]], 1) / (a2[:, None] + EPS)  # [nblk, 2]

    support = _PAIRS[best]  # [nblk, 2]
    d = torch.zeros_like(c_old).scatter_(1, support, v) - c_old  # change of the group's 4 entries
    # Exact change of the block's loss: ||E_w + a (d^T B_gw)||^2 - ||E_w||^2 = 2 d^T B_gw E_w^T a + ||a||^2 ||d^T B_gw||^2
    dbw = (d[:, :, None] * bw).sum(1)  # [nblk, b]
    delta = 2 * (dbw * eta).sum(1) + a2 * dbw.square().sum(1)
    ok = (delta <= 0) & torch.isfinite(delta) & (a2 > EPS)
    if not ok.any():
        return 0
    r_ok, c_ok = rows[ok][:, None], cols[ok]
    p.mask[r_ok, c_ok] = False
    p.mask[r_ok, c_ok.gather(1, support[ok])] = True
    p.values[r_ok, c_ok] = (c_old + d)[ok]
    upd = a_vec[ok][:, :, None] * (d[ok][:, :, None] * b_rows[ok]).sum(1)[:, None, :]  # a (d^T B_g), unweighted
    e4[I[ok], :, J[ok], :] += upd  # each block once, so gather-add-scatter is exact
    return int(ok.sum())


def fold(p: ArmorProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A', C, B') in the original scale: A' = diag(r) A, B' = B diag(c); A' C B' ~ W."""
    blk = p.a.shape[1]
    a = p.a * p.row.reshape(-1, blk)[:, :, None]
    b = p.b * p.col.reshape(-1, blk)[:, None, :]
    return a.contiguous(), p.core.contiguous(), b.contiguous()


@dataclass
class ArmorResult:
    a: torch.Tensor
    core: torch.Tensor
    b: torch.Tensor
    loss_init: float
    loss: float
    iters: int  # iterations run (early stop may end sooner)


def armor_prune(w: torch.Tensor, h: torch.Tensor, block: int, iters: int = 1000, lr: float = 1e-4,
                patience: int = 100, rtol: float = 1e-6, atol: float = 1e-8, seed: int = 0,
                on_iter=None) -> ArmorResult:
    """Run ARMOR on one weight [d_out, d_in] with input importances h [d_in]; iters = 0 gives NoWag-P.

    The discrete step picks its groups with dL/dC from the iteration's Adam step (one Adam step, lr 1e-4, older than
    the authors' fresh gradient): it only sets sampling probabilities, and reusing it saves two of nine products.
    """
    p = init_problem(w, h, block)
    gen = torch.Generator().manual_seed(seed)
    resid = p.residual()
    loss0 = p.loss(resid)
    best = (loss0, p.a.clone(), p.values.clone(), p.mask.clone(), p.b.clone())
    opt = torch.optim.Adam([p.a, p.values, p.b], lr=lr)
    prev, wait, done = loss0, patience, 0
    with torch.no_grad():
        for it in range(iters):
            g_a, g_core, g_b = gradients(p, resid)
            p.a.grad, p.values.grad, p.b.grad = g_a, g_core * p.mask, g_b
            opt.step()
            resid = p.residual()
            discrete_step(p, resid, g_core, gen)
            cur = p.loss(resid)
            done = it + 1
            if cur < best[0]:
                best = (cur, p.a.clone(), p.values.clone(), p.mask.clone(), p.b.clone())
            if on_iter is not None:
                on_iter(it, cur)
            if cur > (1 - rtol) * prev or cur > prev - atol:
                wait -= 1
                if wait <= 0:
                    break
            else:
                wait = patience
            prev = cur
        p.a, p.values, p.mask, p.b = best[1], best[2], best[3], best[4]
        a_f, core, b_f = fold(p)
    return ArmorResult(a_f, core, b_f, loss0, best[0], done)
