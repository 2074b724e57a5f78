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

A second proxy (`hessian=`): the layer's output error itself, L = ||(W_hat' - W) X||^2 / ||W X||^2 with the full
H = X X^T (what SparseGPT minimises), started from SparseGPT's 2:4 weight instead of NoWag-P. In normalised
coordinates that is sum_i r_i^2 E_i H~ E_i^T with H~ = diag(c) H diag(c): the same algebra with E H~ in place of
E * h and rows weighted by r^2. The loss no longer separates over the blocks of a block row (H~ couples columns),
so the discrete step changes one block per block row (the one whose best group change gains most); block rows
stay independent. Never above SparseGPT's own layer loss, by the same best-state rule.
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
    scale: float  # the loss of W_hat = 0 (sum W_bar^2 h, or ||W X||^2 with the full H)
    hess: torch.Tensor | None = None  # H~ = diag(c) X X^T diag(c) [d_in, d_in]: the full proxy; None: NoWag
    row_w: torch.Tensor | None = None  # r^2 [d_out] with the full proxy (rows weighted by their scale)

    @property
    def core(self) -> torch.Tensor:
        return self.values * self.mask

    def residual(self) -> torch.Tensor:
        return armor_weight(self.a, self.core, self.b) - self.w_bar

    def weighted(self, resid: torch.Tensor) -> torch.Tensor:
        """E H~ (E * h for NoWag): half the loss's gradient in W_hat, up to row weights and scale."""
        return resid * self.h if self.hess is None else resid @ self.hess

    def loss(self, resid: torch.Tensor, eh: torch.Tensor | None = None) -> float:
        """The proxy loss of a residual E = A C B - W_bar (eh: its `weighted`, when already computed)."""
        prod = resid * (self.weighted(resid) if eh is None else eh)
        if self.row_w is not None:
            prod = prod * self.row_w[:, None]
        return float(prod.sum() / self.scale)


def init_problem(w: torch.Tensor, h: torch.Tensor, block: int, hessian: torch.Tensor | None = None,
                 start: torch.Tensor | None = None) -> ArmorProblem:
    """Normalise, A = B = I; the core is NoWag-P (mask by W_bar^2 h) or, given `start`, that 2:4 weight (e.g.
    SparseGPT's). hessian: X X^T [d_in, d_in] for the full proxy (h is then its diagonal)."""
    w = w.detach().float()
    d_out, d_in = w.shape
    check_block(block, d_out, d_in)
    h = (torch.diagonal(hessian) if hessian is not None else h).detach().float().clone()
    ok = torch.isfinite(h) & (h > 0)
    # Dead inputs (never active in calibration) get the mean importance, as the authors' code does.
    fill = h[ok].mean() if ok.any() else torch.tensor(1.0)
    h[~ok] = fill
    col = w.norm(dim=0) + EPS
    w1 = w / col
    row = w1.norm(dim=1) + EPS
    w_bar = w1 / row[:, None]
    if start is None:
        mask, values = mask_24(w_bar.square() * h), w_bar.clone()
    else:
        start = start.detach().float()
        mask = mask_24(start.abs())
        if not torch.equal(start * mask, start):
            raise ValueError("ARMOR's start weight is not 2:4")
        values = start / (row[:, None] * col)
    eye_a = torch.eye(block).expand(d_out // block, block, block).clone()
    eye_b = torch.eye(block).expand(d_in // block, block, block).clone()
    if hessian is None:
        scale = float((w_bar.square() * h).sum())
        return ArmorProblem(w_bar, h, row, col, eye_a, values, mask, eye_b, max(scale, 1e-30))
    hess = hessian.detach().float().clone()
    dead = ~ok
    hess[dead, :], hess[:, dead] = 0.0, 0.0
    hess[dead, dead] = fill
    hess = hess * col[:, None] * col[None, :]
    row_w = row.square()
    scale = float(((w_bar @ hess) * w_bar * row_w[:, None]).sum())
    return ArmorProblem(w_bar, h, row, col, eye_a, values, mask, eye_b, max(scale, 1e-30), hess, row_w)


def _blocks(m: torch.Tensor, n0: int, n1: int, blk: int) -> torch.Tensor:
    """[n0*blk, n1*blk] -> [n0, n1, blk, blk] (block (I, J) at [I, J])."""
    return m.reshape(n0, blk, n1, blk).transpose(1, 2)


def gradients(p: ArmorProblem, resid: torch.Tensor, eh: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dA, dL/dC, dL/dB) at the current factors, given their residual E = A C B - W_bar (and its `weighted`, if
    computed); no autograd: the three products are cheaper written out."""
    blk = p.a.shape[1]
    d_out, d_in = p.w_bar.shape
    n0, n1 = d_out // blk, d_in // blk
    r = (p.weighted(resid) if eh is None else eh) * (2.0 / p.scale)  # dL/dW_hat
    if p.row_w is not None:
        r = r * p.row_w[:, None]
    core = p.core
    g_core = bd_left(p.a.transpose(1, 2), bd_right(r, p.b.transpose(1, 2)))
    cb = bd_right(core, p.b)
    g_a = torch.bmm(r.reshape(n0, blk, d_in), cb.reshape(n0, blk, d_in).transpose(1, 2))
    ac = bd_left(p.a, core)
    g_b = torch.einsum("knp,knq->npq", ac.reshape(d_out, n1, blk), r.reshape(d_out, n1, blk))
    return g_a, g_core, g_b


@torch.no_grad()
def discrete_step(p: ArmorProblem, resid: torch.Tensor, grad_core: torch.Tensor,
                  generator: torch.Generator | None = None, eh: torch.Tensor | None = None) -> int:
    """One ARMOR sparse-core step, given the residual E = A C B - W_bar and dL/dC (which picks the groups); E (and
    eh = E H~, needed with the full proxy) are updated in place where blocks change; returns how many changed.

    For the drawn group of block (I, J) (row i = I b + rho, columns J b + 4 gamma + 0..3), a = A_I[:, rho] and B_g
    the group's 4 rows of B_J, changing the group's values by d changes W_hat by a (d^T B_g) and the loss (times
    scale) by 2 d^T phi + alpha d^T G d, with alpha = sum_i w_i a_i^2 (w: row weights, 1 for NoWag),
    phi = B_g (sum_i w_i a_i (E H~)_{i,J}) and G = B_g H~_JJ B_g^T (H~_JJ = diag(h_J) for NoWag). On a support S
    the best new values are v_S = -G_S^-1 f_S / alpha with f = phi - alpha G c_old, gaining f_S^T G_S^-1 f_S / alpha;
    the current support is one of the six, so the best never raises the block's loss, and a block changes only where
    its exact change is not positive (guards rounding when G_S is near singular). NoWag's loss separates over blocks,
    so every block takes its step; with the full H~ only the best block of each block row does.
    """
    blk = p.a.shape[1]
    d_out, d_in = p.w_bar.shape
    n0, n1, gpb = d_out // blk, d_in // blk, blk // 4
    nblk = n0 * n1
    full = p.hess is not None
    if full and eh is None:
        raise ValueError("the full proxy's discrete step needs eh = E H~ (kept up to date in place)")
    own = eh is None  # NoWag: E * h is cheap to form here, and nothing to keep up to date
    if own:
        eh = p.weighted(resid)
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

    a_vec = p.a[I, :, rho]  # [nblk, b]: column rho of A_I
    a_w = a_vec if p.row_w is None else a_vec * p.row_w.reshape(n0, blk)[I]
    alpha = (a_w * a_vec).sum(1)  # [nblk]
    b_rows = p.b[J[:, None], (4 * gamma)[:, None] + torch.arange(4), :]  # [nblk, 4, b]: rows of B_J
    c_old = p.core[rows[:, None], cols]  # [nblk, 4]
    e4, eh4 = resid.view(n0, blk, n1, blk), eh.view(n0, blk, n1, blk)
    eta = (eh4[I, :, J, :] * a_w[:, :, None]).sum(1)  # [nblk, b] (the only full-size pass)
    phi = (b_rows * eta[:, None, :]).sum(-1)  # [nblk, 4]
    if full:
        h_jj = p.hess.view(n1, blk, n1, blk)[torch.arange(n1), :, torch.arange(n1), :]  # [n1, b, b]
        gram = b_rows @ h_jj[J] @ b_rows.transpose(1, 2)
    else:
        bw = b_rows * p.h.reshape(n1, blk)[J][:, None, :].sqrt()
        gram = bw @ bw.transpose(1, 2)  # [nblk, 4, 4]
    f = phi - alpha[:, None] * (gram @ c_old[:, :, None]).squeeze(2)

    i0, i1 = _PAIRS[:, 0], _PAIRS[:, 1]
    g00 = gram[:, i0, i0] + 1e-9  # the six 2 x 2 systems, solved in closed form
    g11 = gram[:, i1, i1] + 1e-9
    g01 = gram[:, i0, i1]
    f0, f1 = f[:, i0], f[:, i1]
    det = g00 * g11 - g01 * g01
    s0 = (g11 * f0 - g01 * f1) / det
    s1 = (g00 * f1 - g01 * f0) / det  # (s0, s1) = G_S^-1 f_S, [nblk, 6]
    gain = (f0 * s0 + f1 * s1) / (alpha[:, None] + EPS)  # loss decrease per support
    gain = torch.where(torch.isfinite(gain), gain, torch.full_like(gain, -math.inf))
    best = gain.argmax(1)
    v = -torch.stack([s0[bi, best], s1[bi, best]], 1) / (alpha[:, None] + EPS)  # [nblk, 2]

    support = _PAIRS[best]  # [nblk, 2]
    d = torch.zeros_like(c_old).scatter_(1, support, v) - c_old  # change of the group's 4 entries
    delta = 2 * (d * phi).sum(1) + alpha * (d[:, None, :] @ gram @ d[:, :, None]).reshape(-1)  # exact
    ok = (delta <= 0) & torch.isfinite(delta) & (alpha > EPS)
    if full:  # one block per block row: the one gaining most
        key = torch.where(ok, delta, torch.full_like(delta, math.inf)).view(n0, n1)
        chosen = torch.zeros_like(ok).view(n0, n1)
        chosen[torch.arange(n0), key.argmin(1)] = True
        ok = ok & chosen.view(-1)
    if not ok.any():
        return 0
    r_ok, c_ok = rows[ok][:, None], cols[ok]
    p.mask[r_ok, c_ok] = False
    p.mask[r_ok, c_ok.gather(1, support[ok])] = True
    p.values[r_ok, c_ok] = (c_old + d)[ok]
    upd = a_vec[ok][:, :, None] * (d[ok][:, :, None] * b_rows[ok]).sum(1)[:, None, :]  # a (d^T B_g), [k, b, b]
    e4[I[ok], :, J[ok], :] += upd  # each block once, so gather-add-scatter is exact
    if full:  # E H~ changes on the block row's b rows: upd @ H~[block J's rows, :]
        eh.view(n0, blk, d_in)[I[ok]] += torch.bmm(upd, p.hess.view(n1, blk, d_in)[J[ok]])
    elif not own:
        eh4[I[ok], :, J[ok], :] += upd * p.h.reshape(n1, blk)[J[ok]][:, None, :]
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
                on_iter=None, hessian: torch.Tensor | None = None, start: torch.Tensor | None = None) -> ArmorResult:
    """Run ARMOR on one weight [d_out, d_in] with input importances h [d_in]; iters = 0 gives the start (NoWag-P).
    hessian: X X^T for the full proxy; start: a 2:4 weight to start from instead of NoWag-P (e.g. SparseGPT's).

    The discrete step picks its groups with dL/dC from the iteration's Adam step (one Adam step, lr 1e-4, older than
    the authors' fresh gradient): it only sets sampling probabilities, and reusing it saves two of nine products.
    """
    p = init_problem(w, h, block, hessian, start)
    gen = torch.Generator().manual_seed(seed)
    resid = p.residual()
    eh = p.weighted(resid)
    loss0 = p.loss(resid, eh)
    best = (loss0, p.a.clone(), p.values.clone(), p.mask.clone(), p.b.clone())
    opt = torch.optim.Adam([p.a, p.values, p.b], lr=lr)
    prev, wait, done = loss0, patience, 0
    with torch.no_grad():
        for it in range(iters):
            g_a, g_core, g_b = gradients(p, resid, eh)
            p.a.grad, p.values.grad, p.b.grad = g_a, g_core * p.mask, g_b
            opt.step()
            resid = p.residual()
            eh = p.weighted(resid)  # with the full proxy the one d_out x d_in x d_in product of the iteration
            discrete_step(p, resid, g_core, gen, eh)
            cur = p.loss(resid, eh)
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
