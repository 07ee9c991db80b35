"""Fused neighborhood-attention backward in Triton.

Two kernels, neither of which writes a ``[tokens, kernel]`` matrix to global memory and none of
which uses atomics, so gradients are bitwise reproducible:

* ``_na_bwd_dq_kernel`` mirrors the forward: a query tile walks its key box, recomputes the
  probabilities from the saved logsumexp and accumulates ``dq``.
* ``_na_bwd_dkdv_kernel`` owns a tile of keys (one kv head, every query head of its GQA group) and
  walks the queries that can see it. Window starts and ends grow monotonically with the query
  coordinate, so on every axis those queries form an interval, found by bisection.
* With a relative positional bias, the dq pass also sums ``dS`` per bias entry; the per-tile partial
  sums are added up afterwards in a fixed order.

``delta = rowsum(dO * O) - dlse`` is computed in PyTorch before the launch, as in FlashAttention-2
(https://arxiv.org/abs/2307.08691).
"""
import math

import torch
import triton
import triton.language as tl

from .._backend import interpreter_mode
from .triton_na import LOG2E, _as_3d, _num_warps, _tile_coords, _tiles, _window


@triton.jit
def _query_range(a, b, group_len, K: tl.constexpr, S: tl.constexpr, CAUSAL: tl.constexpr, NSTEPS):
    """Queries (group coordinates) whose window meets the keys ``[a, b]`` on one axis: ``[lo, hi]``
    (empty when ``lo > hi``). Bisection on the monotone window start and end."""
    # lo: first query whose window ends at or after a
    lo = a * 0
    hi = group_len
    for _ in range(NSTEPS):
        mid = (lo + hi) // 2
        _, end = _window(mid, group_len, K, S, CAUSAL)
        active = lo < hi
        hi = tl.where(active & (end >= a), mid, hi)
        lo = tl.where(active & (end < a), mid + 1, lo)
    first = lo
    # hi: last query whose window starts at or before b
    lo = a * 0
    hi = group_len
    for _ in range(NSTEPS):
        mid = (lo + hi) // 2
        start, _ = _window(mid, group_len, K, S, CAUSAL)
        active = lo < hi
        hi = tl.where(active & (start > b), mid, hi)
        lo = tl.where(active & (start <= b), mid + 1, lo)
    return first, lo - 1


@triton.jit
def _na_bwd_dq_kernel(
        Q, Kt, V, RPB, DO, LSE, DELTA, DQ, DRPB,
        sq_b, sq_0, sq_1, sq_2, sq_h,
        sk_b, sk_0, sk_1, sk_2, sk_h,
        sv_b, sv_0, sv_1, sv_2, sv_h,
        so_b, so_0, so_1, so_2, so_h,
        sl_b, sl_0, sl_1, sl_2,
        sr_h, sr_0, sr_1, sr_2,
        L0, L1, L2, HEADS_Q, HEADS_KV, HEAD_DIM, HEAD_DIM_V,
        scale,
        K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
        S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
        D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
        C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
        TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
        KB1: tl.constexpr, KB2: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        HAS_RPB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BIN_CHUNK: tl.constexpr, BIN_CHUNKS: tl.constexpr, BIN_ROWS: tl.constexpr,
):
    """``dq`` of one query tile (dq shares q's strides) and, with a bias, the tile's share of ``d rpb``.

    The bias gradient of a pair is its ``dS``; the pairs of one bias entry lie on a diagonal of the
    ``dS`` block, so each block is re-gathered per query as ``[query, relative offset]`` and summed
    over queries. With a bias the tile is one row of axis 0 (``TQ0 == 1``), so each key row ``k0``
    is one bias row and its sums are written once to ``DRPB[b, h, tile, k0 - x0 + K0 - 1, :]``.
    """
    BLOCK_Q: tl.constexpr = TQ0 * TQ1 * TQ2
    BLOCK_K: tl.constexpr = KB1 * KB2
    R0: tl.constexpr = 2 * K0 - 1
    R1: tl.constexpr = 2 * K1 - 1
    R2: tl.constexpr = 2 * K2 - 1
    bh = tl.program_id(1)
    b = bh // HEADS_Q
    h = bh % HEADS_Q
    hk = h // (HEADS_Q // HEADS_KV)
    g0, g1, g2, t0, t1, t2, gl0, gl1, gl2 = _tile_coords(tl.program_id(0), L0, L1, L2, D0, D1, D2, TQ0, TQ1, TQ2)

    offs_q = tl.arange(0, BLOCK_Q)
    xq0 = t0 * TQ0 + offs_q // (TQ1 * TQ2)
    xq1 = t1 * TQ1 + (offs_q // TQ2) % TQ1
    xq2 = t2 * TQ2 + offs_q % TQ2
    q_valid = (xq0 < gl0) & (xq1 < gl1) & (xq2 < gl2)
    qs0, qe0 = _window(xq0, gl0, K0, S0, C0)
    qs1, qe1 = _window(xq1, gl1, K1, S1, C1)
    qs2, qe2 = _window(xq2, gl2, K2, S2, C2)
    lo0, _ = _window(t0 * TQ0, gl0, K0, S0, C0)
    lo1, _ = _window(t1 * TQ1, gl1, K1, S1, C1)
    lo2, _ = _window(t2 * TQ2, gl2, K2, S2, C2)
    _, hi0 = _window(tl.minimum(t0 * TQ0 + TQ0 - 1, gl0 - 1), gl0, K0, S0, C0)
    _, hi1 = _window(tl.minimum(t1 * TQ1 + TQ1 - 1, gl1 - 1), gl1, K1, S1, C1)
    _, hi2 = _window(tl.minimum(t2 * TQ2 + TQ2 - 1, gl2 - 1), gl2, K2, S2, C2)

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row = b * sq_b + h * sq_h + (xq0 * D0 + g0) * sq_0 + (xq1 * D1 + g1) * sq_1 + (xq2 * D2 + g2) * sq_2
    orow = b * so_b + h * so_h + (xq0 * D0 + g0) * so_0 + (xq1 * D1 + g1) * so_1 + (xq2 * D2 + g2) * so_2
    q = tl.load(Q + row[:, None] + offs_d[None, :], mask=q_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + orow[:, None] + offs_dv[None, :], mask=q_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
                 other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lrow = b * sl_b + h + (xq0 * D0 + g0) * sl_0 + (xq1 * D1 + g1) * sl_1 + (xq2 * D2 + g2) * sl_2
    lse = tl.load(LSE + lrow, mask=q_valid, other=0.0)
    lse = tl.where(lse == float('-inf'), float('inf'), lse) * LOG2E  # fully masked rows: p = 0
    delta = tl.load(DELTA + lrow, mask=q_valid, other=0.0)

    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    offs_bin = tl.arange(0, BIN_CHUNK)
    offs_chunk = tl.arange(0, BIN_ROWS)
    qk_scale = scale * LOG2E
    for k0 in range(lo0, hi0 + 1):
        in0 = q_valid & (k0 >= qs0) & (k0 <= qe0)
        if HAS_RPB:
            bins = tl.zeros([BIN_ROWS, BIN_CHUNK], tl.float32)
        for k1 in range(lo1, hi1 + 1, KB1):
            for k2 in range(lo2, hi2 + 1, KB2):
                xk1 = k1 + offs_k // KB2
                xk2 = k2 + offs_k % KB2
                k_valid = (xk1 <= hi1) & (xk2 <= hi2)
                krow = (b * sk_b + hk * sk_h + (k0 * D0 + g0) * sk_0 + (xk1 * D1 + g1) * sk_1
                        + (xk2 * D2 + g2) * sk_2)
                vrow = (b * sv_b + hk * sv_h + (k0 * D0 + g0) * sv_0 + (xk1 * D1 + g1) * sv_1
                        + (xk2 * D2 + g2) * sv_2)
                kb = tl.load(Kt + krow[:, None] + offs_d[None, :],
                             mask=k_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
                vb = tl.load(V + vrow[:, None] + offs_dv[None, :],
                             mask=k_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
                if UPCAST:
                    kb = kb.to(tl.float32)
                    vb = vb.to(tl.float32)
                s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * qk_scale
                mask = (in0[:, None] & k_valid[None, :]
                        & (xk1[None, :] >= qs1[:, None]) & (xk1[None, :] <= qe1[:, None])
                        & (xk2[None, :] >= qs2[:, None]) & (xk2[None, :] <= qe2[:, None]))
                if HAS_RPB:
                    r_ptrs = (RPB + h * sr_h + (k0 - xq0 + K0 - 1)[:, None] * sr_0
                              + (xk1[None, :] - xq1[:, None] + K1 - 1) * sr_1
                              + (xk2[None, :] - xq2[:, None] + K2 - 1) * sr_2)
                    s += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32) * LOG2E
                p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(vb), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(kb.dtype), kb, input_precision=PRECISION)
                if HAS_RPB:
                    for c in tl.static_range(BIN_CHUNKS):
                        n = c * BIN_CHUNK + offs_bin
                        j1 = xq1[:, None] + (n // R2)[None, :] - (K1 - 1) - k1
                        j2 = xq2[:, None] + (n % R2)[None, :] - (K2 - 1) - k2
                        inside = (j1 >= 0) & (j1 < KB1) & (j2 >= 0) & (j2 < KB2) & (n < R1 * R2)[None, :]
                        picked = tl.gather(ds, tl.where(inside, j1 * KB2 + j2, 0), 1)
                        part = tl.sum(tl.where(inside, picked, 0.0), 0)
                        bins += tl.where(offs_chunk[:, None] == c, part[None, :], 0.0)
        if HAS_RPB:
            r0 = k0 - t0 + K0 - 1  # TQ0 == 1: the tile's row is t0
            n = offs_chunk[:, None] * BIN_CHUNK + offs_bin[None, :]
            tl.store(DRPB + ((bh * tl.num_programs(0) + tl.program_id(0)) * R0 + r0) * (R1 * R2) + n, bins,
                     mask=(n < R1 * R2) & (r0 >= 0) & (r0 < R0) & (t0 < gl0))

    dq = dq * scale
    tl.store(DQ + row[:, None] + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_valid[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _na_bwd_dkdv_kernel(
        Q, Kt, V, RPB, DO, LSE, DELTA, DK, DV,
        sq_b, sq_0, sq_1, sq_2, sq_h,
        sk_b, sk_0, sk_1, sk_2, sk_h,
        sv_b, sv_0, sv_1, sv_2, sv_h,
        so_b, so_0, so_1, so_2, so_h,
        sl_b, sl_0, sl_1, sl_2,
        sr_h, sr_0, sr_1, sr_2,
        L0, L1, L2, HEADS_Q, HEADS_KV, HEAD_DIM, HEAD_DIM_V,
        scale, NSTEPS,
        K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
        S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
        D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
        C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
        TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
        QB1: tl.constexpr, QB2: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        HAS_RPB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``dk``/``dv`` of one key tile, summed over the query heads sharing its kv head (GQA);
    dk shares k's strides and dv v's."""
    BLOCK_K: tl.constexpr = TK0 * TK1 * TK2
    BLOCK_Q: tl.constexpr = QB1 * QB2
    bh = tl.program_id(1)
    b = bh // HEADS_KV
    hk = bh % HEADS_KV
    group = HEADS_Q // HEADS_KV
    g0, g1, g2, t0, t1, t2, gl0, gl1, gl2 = _tile_coords(tl.program_id(0), L0, L1, L2, D0, D1, D2, TK0, TK1, TK2)

    offs_k = tl.arange(0, BLOCK_K)
    xk0 = t0 * TK0 + offs_k // (TK1 * TK2)
    xk1 = t1 * TK1 + (offs_k // TK2) % TK1
    xk2 = t2 * TK2 + offs_k % TK2
    k_valid = (xk0 < gl0) & (xk1 < gl1) & (xk2 < gl2)
    lo0, hi0 = _query_range(t0 * TK0, tl.minimum(t0 * TK0 + TK0 - 1, gl0 - 1), gl0, K0, S0, C0, NSTEPS)
    lo1, hi1 = _query_range(t1 * TK1, tl.minimum(t1 * TK1 + TK1 - 1, gl1 - 1), gl1, K1, S1, C1, NSTEPS)
    lo2, hi2 = _query_range(t2 * TK2, tl.minimum(t2 * TK2 + TK2 - 1, gl2 - 1), gl2, K2, S2, C2, NSTEPS)

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    krow = b * sk_b + hk * sk_h + (xk0 * D0 + g0) * sk_0 + (xk1 * D1 + g1) * sk_1 + (xk2 * D2 + g2) * sk_2
    vrow = b * sv_b + hk * sv_h + (xk0 * D0 + g0) * sv_0 + (xk1 * D1 + g1) * sv_1 + (xk2 * D2 + g2) * sv_2
    kb = tl.load(Kt + krow[:, None] + offs_d[None, :], mask=k_valid[:, None] & (offs_d[None, :] < HEAD_DIM),
                 other=0.0)
    vb = tl.load(V + vrow[:, None] + offs_dv[None, :], mask=k_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
                 other=0.0)
    if UPCAST:
        kb = kb.to(tl.float32)
        vb = vb.to(tl.float32)

    dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_DV], tl.float32)
    offs_q = tl.arange(0, BLOCK_Q)
    qk_scale = scale * LOG2E
    for hg in range(0, group):
        h = hk * group + hg
        for q0 in range(lo0, hi0 + 1):
            qs0, qe0 = _window(q0, gl0, K0, S0, C0)
            in0 = k_valid & (xk0 >= qs0) & (xk0 <= qe0)
            for q1 in range(lo1, hi1 + 1, QB1):
                for q2 in range(lo2, hi2 + 1, QB2):
                    xq1 = q1 + offs_q // QB2
                    xq2 = q2 + offs_q % QB2
                    q_valid = (xq1 <= hi1) & (xq2 <= hi2)
                    qrow = (b * sq_b + h * sq_h + (q0 * D0 + g0) * sq_0 + (xq1 * D1 + g1) * sq_1
                            + (xq2 * D2 + g2) * sq_2)
                    orow = (b * so_b + h * so_h + (q0 * D0 + g0) * so_0 + (xq1 * D1 + g1) * so_1
                            + (xq2 * D2 + g2) * so_2)
                    qb = tl.load(Q + qrow[:, None] + offs_d[None, :],
                                 mask=q_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
                    dob = tl.load(DO + orow[:, None] + offs_dv[None, :],
                                  mask=q_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
                    if UPCAST:
                        qb = qb.to(tl.float32)
                        dob = dob.to(tl.float32)
                    lrow = b * sl_b + h + (q0 * D0 + g0) * sl_0 + (xq1 * D1 + g1) * sl_1 + (xq2 * D2 + g2) * sl_2
                    lse = tl.load(LSE + lrow, mask=q_valid, other=0.0)
                    lse = tl.where(lse == float('-inf'), float('inf'), lse) * LOG2E
                    delta = tl.load(DELTA + lrow, mask=q_valid, other=0.0)
                    qs1, qe1 = _window(xq1, gl1, K1, S1, C1)
                    qs2, qe2 = _window(xq2, gl2, K2, S2, C2)
                    # transposed scores: rows are keys, columns are queries
                    st = tl.dot(kb, tl.trans(qb), input_precision=PRECISION) * qk_scale
                    mask = (in0[:, None] & q_valid[None, :]
                            & (xk1[:, None] >= qs1[None, :]) & (xk1[:, None] <= qe1[None, :])
                            & (xk2[:, None] >= qs2[None, :]) & (xk2[:, None] <= qe2[None, :]))
                    if HAS_RPB:
                        r_ptrs = (RPB + h * sr_h + (xk0 - q0 + K0 - 1)[:, None] * sr_0
                                  + (xk1[:, None] - xq1[None, :] + K1 - 1) * sr_1
                                  + (xk2[:, None] - xq2[None, :] + K2 - 1) * sr_2)
                        st += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32) * LOG2E
                    pt = tl.where(mask, tl.exp2(st - lse[None, :]), 0.0)
                    dv += tl.dot(pt.to(dob.dtype), dob, input_precision=PRECISION)
                    dpt = tl.dot(vb, tl.trans(dob), input_precision=PRECISION)
                    dst = pt * (dpt - delta[None, :])
                    dk += tl.dot(dst.to(qb.dtype), qb, input_precision=PRECISION)

    dk = dk * scale
    tl.store(DK + krow[:, None] + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=k_valid[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + vrow[:, None] + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=k_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


_BIN_CHUNK = 64  # bias entries gathered at once in the dq pass


def _bisection_steps(length: int) -> int:
    return max(1, math.ceil(math.log2(length + 1)) + 1)


def na_backward_triton(dout, dlse, q, k, v, out, lse, rpb, kernel_size, stride, dilation, is_causal, scale):
    """Launch the fused backward; arguments already validated. Returns ``(dq, dk, dv, drpb or None)``."""
    rank = q.dim() - 3
    pad = 3 - rank
    ks = [1] * pad + list(kernel_size)
    st = [1] * pad + list(stride)
    dl = [1] * pad + list(dilation)
    ca = [False] * pad + list(is_causal)
    B = q.shape[0]
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    q, k, v = (t.contiguous() for t in (q, k, v))
    dout = dout.to(q.dtype).contiguous()
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    lse = lse.float().contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    q3, k3, v3, do3, dq3, dk3, dv3 = (_as_3d(t, rank) for t in (q, k, v, dout, dq, dk, dv))
    lse3, delta3 = (_as_3d(t.unsqueeze(-1), rank).squeeze(-1) for t in (lse, delta.contiguous()))
    L = q3.shape[1:4]
    tq, kb = _tiles(rank, max(head_dim, head_dim_v))

    def n_tiles(tile):
        n = 1
        for a in range(3):
            n *= dl[a] * math.ceil(math.ceil(L[a] / dl[a]) / tile[a])
        return n

    if rpb is not None:
        r3 = rpb.reshape(heads_q, *([1] * pad), *rpb.shape[1:])
        r_strides = r3.stride()
    else:
        r3 = q
        r_strides = (0, 0, 0, 0)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    precision = 'ieee' if q.dtype == torch.float32 else 'tf32'
    upcast = interpreter_mode() and q.dtype == torch.bfloat16
    common = dict(K0=ks[0], K1=ks[1], K2=ks[2], S0=st[0], S1=st[1], S2=st[2], D0=dl[0], D1=dl[1], D2=dl[2],
                  C0=ca[0], C1=ca[1], C2=ca[2], BLOCK_D=block_d, BLOCK_DV=block_dv, HAS_RPB=rpb is not None,
                  PRECISION=precision, UPCAST=upcast, num_warps=_num_warps(max(head_dim, head_dim_v)))
    strides = (*[q3.stride(i) for i in range(5)], *[k3.stride(i) for i in range(5)],
               *[v3.stride(i) for i in range(5)], *[do3.stride(i) for i in range(5)],
               *[lse3.stride(i) for i in range(4)], *r_strides,
               L[0], L[1], L[2], heads_q, heads_kv, head_dim, head_dim_v, scale)
    # with a bias the dq pass takes single-row tiles on axis 0: one bias row per key row (see the kernel)
    tq_dq = tq if rpb is None or tq[0] == 1 else _tiles(2, max(head_dim, head_dim_v))[0]
    drpb = partial = None
    bins = 1
    if rpb is not None:
        bins = (2 * ks[1] - 1) * (2 * ks[2] - 1)
        partial = torch.zeros(B, heads_q, n_tiles(tq_dq), 2 * ks[0] - 1, bins, device=q.device, dtype=torch.float32)
    _na_bwd_dq_kernel[(n_tiles(tq_dq), B * heads_q)](
        q3, k3, v3, r3, do3, lse3, delta3, dq3, partial if partial is not None else dq3, *strides,
        TQ0=tq_dq[0], TQ1=tq_dq[1], TQ2=tq_dq[2], KB1=kb[0], KB2=kb[1],
        BIN_CHUNK=_BIN_CHUNK, BIN_CHUNKS=triton.cdiv(bins, _BIN_CHUNK),
        BIN_ROWS=triton.next_power_of_2(triton.cdiv(bins, _BIN_CHUNK)), **common)
    if partial is not None:
        drpb = partial.sum((0, 2)).reshape(rpb.shape).to(rpb.dtype)
    steps = _bisection_steps(max(L))
    _na_bwd_dkdv_kernel[(n_tiles(tq), B * heads_kv)](
        q3, k3, v3, r3, do3, lse3, delta3, dk3, dv3, *strides, steps,
        TK0=tq[0], TK1=tq[1], TK2=tq[2], QB1=kb[0], QB2=kb[1], **common)
    return dq, dk, dv, drpb
