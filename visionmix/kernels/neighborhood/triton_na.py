"""Fused neighborhood-attention forward in Triton.

One kernel serves 1-D, 2-D and 3-D maps: lower ranks are viewed as 3-D with unit axes. A program
owns a tile of queries from one dilation group and one (batch, head). Because window starts and
ends grow monotonically with the query coordinate, the keys of the whole tile form one box in
group coordinates; the program walks that box in blocks, masks every (query, key) pair with the
per-axis window rule and accumulates an online softmax, so no ``[tokens, kernel]`` attention matrix
ever reaches global memory.
"""
import math

import torch
import triton
import triton.language as tl

from .._backend import interpreter_mode

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _window(xg, group_len, K: tl.constexpr, S: tl.constexpr, CAUSAL: tl.constexpr):
    """Inclusive ``[start, end]`` of the keys (group coordinates) a query at ``xg`` sees on one axis."""
    if CAUSAL:
        leader = tl.minimum((xg // S) * S + S - 1, group_len - 1)
        start = tl.maximum(leader - K + 1, 0)
        end = xg
    else:
        leader = tl.minimum((xg // S) * S + S // 2, group_len - 1)
        center = tl.minimum(tl.maximum(leader, K // 2), group_len - 1 - (K // 2 + K % 2 - 1))
        start = center - K // 2
        end = start + K - 1
    return start, end


@triton.jit
def _tile_coords(pid, L0, L1, L2, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                 T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Program id -> (dilation group, tile index, group length) on every axis (forward's order)."""
    nt2 = tl.cdiv(tl.cdiv(L2, D2), T2)
    nt1 = tl.cdiv(tl.cdiv(L1, D1), T1)
    nt0 = tl.cdiv(tl.cdiv(L0, D0), T0)
    t2 = pid % nt2
    pid = pid // nt2
    g2 = pid % D2
    pid = pid // D2
    t1 = pid % nt1
    pid = pid // nt1
    g1 = pid % D1
    pid = pid // D1
    t0 = pid % nt0
    g0 = pid // nt0
    gl0 = (L0 - g0 + D0 - 1) // D0
    gl1 = (L1 - g1 + D1 - 1) // D1
    gl2 = (L2 - g2 + D2 - 1) // D2
    return g0, g1, g2, t0, t1, t2, gl0, gl1, gl2


@triton.jit
def _na_fwd_kernel(
        Q, Kt, V, RPB, Out, LSE,
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
):
    BLOCK_Q: tl.constexpr = TQ0 * TQ1 * TQ2
    BLOCK_K: tl.constexpr = KB1 * KB2
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HEADS_Q
    h = bh % HEADS_Q
    hk = h // (HEADS_Q // HEADS_KV)

    g0, g1, g2, t0, t1, t2, gl0, gl1, gl2 = _tile_coords(pid, L0, L1, L2, D0, D1, D2, TQ0, TQ1, TQ2)

    offs_q = tl.arange(0, BLOCK_Q)
    xq0 = t0 * TQ0 + offs_q // (TQ1 * TQ2)
    xq1 = t1 * TQ1 + (offs_q // TQ2) % TQ1
    xq2 = t2 * TQ2 + offs_q % TQ2
    q_valid = (xq0 < gl0) & (xq1 < gl1) & (xq2 < gl2)
    qs0, qe0 = _window(xq0, gl0, K0, S0, C0)
    qs1, qe1 = _window(xq1, gl1, K1, S1, C1)
    qs2, qe2 = _window(xq2, gl2, K2, S2, C2)
    # key box of the whole tile: windows move monotonically with the query coordinate
    lo0, _ = _window(t0 * TQ0, gl0, K0, S0, C0)
    lo1, _ = _window(t1 * TQ1, gl1, K1, S1, C1)
    lo2, _ = _window(t2 * TQ2, gl2, K2, S2, C2)
    _, hi0 = _window(tl.minimum(t0 * TQ0 + TQ0 - 1, gl0 - 1), gl0, K0, S0, C0)
    _, hi1 = _window(tl.minimum(t1 * TQ1 + TQ1 - 1, gl1 - 1), gl1, K1, S1, C1)
    _, hi2 = _window(tl.minimum(t2 * TQ2 + TQ2 - 1, gl2 - 1), gl2, K2, S2, C2)

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = (Q + b * sq_b + h * sq_h + (xq0 * D0 + g0)[:, None] * sq_0 + (xq1 * D1 + g1)[:, None] * sq_1
              + (xq2 * D2 + g2)[:, None] * sq_2 + offs_d[None, :])
    q = tl.load(q_ptrs, mask=q_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_Q], float('-inf'), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    qk_scale = scale * LOG2E

    for k0 in range(lo0, hi0 + 1):
        in0 = q_valid & (k0 >= qs0) & (k0 <= qe0)
        for k1 in range(lo1, hi1 + 1, KB1):
            for k2 in range(lo2, hi2 + 1, KB2):
                xk1 = k1 + offs_k // KB2
                xk2 = k2 + offs_k % KB2
                k_valid = (xk1 <= hi1) & (xk2 <= hi2)
                k_ptrs = (Kt + b * sk_b + hk * sk_h + (k0 * D0 + g0) * sk_0 + (xk1 * D1 + g1)[:, None] * sk_1
                          + (xk2 * D2 + g2)[:, None] * sk_2 + offs_d[None, :])
                kb = tl.load(k_ptrs, mask=k_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
                if UPCAST:
                    kb = kb.to(tl.float32)
                s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * qk_scale
                mask = (in0[:, None] & k_valid[None, :]
                        & (xk1[None, :] >= qs1[:, None]) & (xk1[None, :] <= qe1[:, None])
                        & (xk2[None, :] >= qs2[:, None]) & (xk2[None, :] <= qe2[:, None]))
                if HAS_RPB:
                    r_ptrs = (RPB + h * sr_h + (k0 - xq0 + K0 - 1)[:, None] * sr_0
                              + (xk1[None, :] - xq1[:, None] + K1 - 1) * sr_1
                              + (xk2[None, :] - xq2[:, None] + K2 - 1) * sr_2)
                    bias = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
                    s += bias * LOG2E
                s = tl.where(mask, s, float('-inf'))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)
                p = tl.exp2(s - m_safe[:, None])
                alpha = tl.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                v_ptrs = (V + b * sv_b + hk * sv_h + (k0 * D0 + g0) * sv_0 + (xk1 * D1 + g1)[:, None] * sv_1
                          + (xk2 * D2 + g2)[:, None] * sv_2 + offs_dv[None, :])
                vb = tl.load(v_ptrs, mask=k_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
                if UPCAST:
                    vb = vb.to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
                m_i = m_new

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * LN2, float('-inf'))
    xo0 = xq0 * D0 + g0
    xo1 = xq1 * D1 + g1
    xo2 = xq2 * D2 + g2
    o_ptrs = (Out + b * so_b + h * so_h + xo0[:, None] * so_0 + xo1[:, None] * so_1 + xo2[:, None] * so_2
              + offs_dv[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + b * sl_b + h + xo0 * sl_0 + xo1 * sl_1 + xo2 * sl_2, lse, mask=q_valid)


# Query tile (axes 0, 1, 2) and key block (axes 1, 2) per rank; halved for head dims above 128
# so that the fp32 accumulators of a tile stay in registers.
_TILES = {
    1: ((1, 1, 64), (1, 64)),
    2: ((1, 8, 8), (4, 16)),
    3: ((2, 4, 8), (4, 16)),
}
_TILES_WIDE = {
    1: ((1, 1, 32), (1, 32)),
    2: ((1, 4, 8), (2, 16)),
    3: ((1, 4, 8), (2, 16)),
}


def _tiles(rank: int, head_dim: int):
    return (_TILES_WIDE if head_dim > 128 else _TILES)[rank]


def _num_warps(head_dim: int) -> int:
    """Warps per program: more for wide heads, whose fp32 accumulators would otherwise spill."""
    if interpreter_mode():
        return 1
    return 4 if head_dim <= 64 else 8


def _as_3d(x: torch.Tensor, rank: int) -> torch.Tensor:
    for _ in range(3 - rank):
        x = x.unsqueeze(1)
    return x


def na_forward_triton(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale):
    """Launch the fused forward; arguments already validated. Returns ``(out, lse)``."""
    rank = q.dim() - 3
    pad = 3 - rank
    ks = [1] * pad + list(kernel_size)
    st = [1] * pad + list(stride)
    dl = [1] * pad + list(dilation)
    ca = [False] * pad + list(is_causal)
    B = q.shape[0]
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = q.new_empty((*q.shape[:-1], head_dim_v))
    lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
    q3, k3, v3, o3 = (_as_3d(t, rank) for t in (q, k, v, out))
    lse3 = _as_3d(lse.unsqueeze(-1), rank).squeeze(-1)
    L = q3.shape[1:4]
    tq, kb = _tiles(rank, max(head_dim, head_dim_v))
    grid_tiles = 1
    for a in range(3):
        grid_tiles *= dl[a] * math.ceil(math.ceil(L[a] / dl[a]) / tq[a])
    if rpb is not None:
        r3 = rpb.reshape(heads_q, *([1] * pad), *rpb.shape[1:])
        r_strides = r3.stride()
    else:
        r3 = q
        r_strides = (0, 0, 0, 0)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    precision = 'ieee' if q.dtype == torch.float32 else 'tf32'
    # Triton's CPU interpreter computes bf16 dots wrongly; fp32 dots of bf16 values give what tensor cores give
    upcast = interpreter_mode() and q.dtype == torch.bfloat16
    _na_fwd_kernel[(grid_tiles, B * heads_q)](
        q3, k3, v3, r3, o3, lse3,
        *[q3.stride(i) for i in range(5)],
        *[k3.stride(i) for i in range(5)],
        *[v3.stride(i) for i in range(5)],
        *[o3.stride(i) for i in range(5)],
        *[lse3.stride(i) for i in range(4)],
        *r_strides,
        L[0], L[1], L[2], heads_q, heads_kv, head_dim, head_dim_v,
        scale,
        K0=ks[0], K1=ks[1], K2=ks[2], S0=st[0], S1=st[1], S2=st[2], D0=dl[0], D1=dl[1], D2=dl[2],
        C0=ca[0], C1=ca[1], C2=ca[2], TQ0=tq[0], TQ1=tq[1], TQ2=tq[2], KB1=kb[0], KB2=kb[1],
        BLOCK_D=block_d, BLOCK_DV=block_dv, HAS_RPB=rpb is not None, PRECISION=precision,
        UPCAST=upcast,
        num_warps=_num_warps(max(head_dim, head_dim_v)),
    )
    return out, lse
