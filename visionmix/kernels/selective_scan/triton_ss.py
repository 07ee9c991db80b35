"""Selective scan in Triton: chunked parallel scan, forward and backward, K scan orders per launch.

One program owns ``BLOCK_D`` channels of one (batch, direction) and keeps their state ``h [BLOCK_D, N]`` in
registers in float32. Time advances a chunk of ``CHUNK`` steps at a time: within a chunk the recurrence
``h[t] = a[t] * h[t-1] + b[t]`` is one ``tl.associative_scan`` over the pairs ``(a, b)``, and the chunk's
start state carries it across chunks. The forward stores each chunk's start state; the backward walks the
chunks in reverse, recomputes the states from them and runs the adjoint recurrence
``dh[t] = C[t] dy[t] + a[t+1] dh[t+1]`` as a reverse scan. Reductions over channels (dB, dC) and over time
(dA, dD, d delta_bias) are written per program and summed on the host: no atomics, bitwise reproducible.
"""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import interpreter_mode

LOG2E = 1.4426950408889634


CHUNK = 16  # time steps per associative scan


def chunk_count(length: int) -> int:
    return max(1, triton.cdiv(length, CHUNK))


def _block_d(dim: int, group_size: int) -> int:
    """Channels per program; with several groups, a power of two dividing the group size (a program reads one
    group's B and C)."""
    block = 16 if interpreter_mode() else 8
    while group_size != dim and group_size % block:
        block //= 2
    return max(1, min(block, triton.next_power_of_2(dim)))


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _softplus(x):
    """``log(1 + exp(x))`` for x <= 20, else x (torch's threshold); accurate for very negative x too."""
    y = tl.exp(-tl.abs(x))
    log1p = tl.where(y < 1e-4, y * (1.0 - 0.5 * y), tl.log(1.0 + y))
    return tl.where(x <= 20.0, tl.maximum(x, 0.0) + log1p, x)


@triton.jit
def _step_tokens(ORDERS, k, offs_t, mask_t, L, HAS_ORDER: tl.constexpr, PERMUTE: tl.constexpr):
    """Token read at each step (u, out) and the index of delta/B/C at each step."""
    if HAS_ORDER:
        tok = tl.load(ORDERS + k * L + offs_t, mask=mask_t, other=0)
    else:
        tok = offs_t
    if PERMUTE:
        par = tok
    else:
        par = offs_t
    return tok, par


@triton.jit
def _load_dt(DELTA, row, par, mask2, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """``(delta + delta_bias, softplus of it or itself)`` at ``[BLOCK_D, CHUNK]``."""
    raw = tl.load(DELTA + row[:, None] + par[None, :], mask=mask2, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    return raw, dt


@triton.jit
def _load_bc(PTR, s_b, s_g, s_n, s_l, b, g, offs_n, par, mask_nt):
    ptr = PTR + b.to(tl.int64) * s_b + g.to(tl.int64) * s_g + offs_n[:, None] * s_n + par[None, :] * s_l
    return tl.load(ptr, mask=mask_nt, other=0.0).to(tl.float32)


@triton.jit
def _chunk_scan(
        U, DELTA, Bm, Cm, ORDERS, BBIAS, h0, a2, bias, row, b, g, k, c, offs_n, mask_d, mask_n, L, N,
        sb_b, sb_g, sb_n, sb_l, sc_b, sc_g, sc_n, sc_l,
        CHUNK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ORDER: tl.constexpr, HAS_BBIAS: tl.constexpr,
        PERMUTE: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """Load chunk ``c``'s inputs and scan it from the state ``h0``: the states ``hs [BLOCK_D, N, CHUNK]`` and what
    the output and the gradients read (steps, tokens, masks, inputs)."""
    offs_t = c * CHUNK + tl.arange(0, CHUNK)
    mask_t = offs_t < L
    mask2 = mask_d[:, None] & mask_t[None, :]
    mask_nt = mask_n[:, None] & mask_t[None, :]
    tok, par = _step_tokens(ORDERS, k, offs_t, mask_t, L, HAS_ORDER, PERMUTE)
    u = tl.load(U + row[:, None] + tok[None, :], mask=mask2, other=0.0).to(tl.float32)
    raw, dt = _load_dt(DELTA, row, par, mask2, bias, HAS_BIAS, SOFTPLUS)
    bt = _load_bc(Bm, sb_b, sb_g, sb_n, sb_l, b, g, offs_n, par, mask_nt)
    if HAS_BBIAS:
        bt += tl.load(BBIAS + (k * N + offs_n[:, None]) * L + offs_t[None, :], mask=mask_nt, other=0.0)
    ct = _load_bc(Cm, sc_b, sc_g, sc_n, sc_l, b, g, offs_n, par, mask_nt)
    valid = mask_t[None, None, :]
    decay = tl.where(valid, tl.exp2(dt[:, None, :] * a2[:, :, None]), 1.0)
    drive = tl.where(valid, (dt * u)[:, None, :] * bt[None, :, :], 0.0)
    scan_a, scan_b = tl.associative_scan((decay, drive), 2, _combine)
    hs = scan_a * h0[:, :, None] + scan_b
    return offs_t, mask2, mask_nt, tok, par, u, raw, dt, bt, ct, drive, hs


@triton.jit
def _ss_fwd_kernel(
        U, DELTA, A, Bm, Cm, Dv, Z, DBIAS, ORDERS, BBIAS, OUT, LAST, CHUNKS,
        batch, dim, L, N, group_size, n_chunks,
        sb_b, sb_g, sb_n, sb_l, sc_b, sc_g, sc_n, sc_l,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ORDER: tl.constexpr,
        HAS_BBIAS: tl.constexpr, PERMUTE: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    k = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    g = (pid_d * BLOCK_D) // group_size
    a2 = tl.load(A + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0) * 1.4426950408889634
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(DBIAS + offs_d, mask=mask_d, other=0.0)
    dvec = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        dvec = tl.load(Dv + offs_d, mask=mask_d, other=0.0)
    row = (b.to(tl.int64) * dim + offs_d) * L
    out_row = (k * batch + b).to(tl.int64) * dim * L + offs_d * L
    state_base = (k * batch + b).to(tl.int64) * n_chunks * dim * N
    last_step = tl.arange(0, CHUNK)[None, None, :] == CHUNK - 1
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for c in range(n_chunks):
        tl.store(CHUNKS + state_base + c * dim * N + offs_d[:, None] * N + offs_n[None, :], h, mask=mask_dn)
        _, mask2, _, tok, _, u, _, _, _, ct, _, hs = _chunk_scan(
            U, DELTA, Bm, Cm, ORDERS, BBIAS, h, a2, bias, row, b, g, k, c, offs_n, mask_d, mask_n, L, N,
            sb_b, sb_g, sb_n, sb_l, sc_b, sc_g, sc_n, sc_l, CHUNK, HAS_BIAS, HAS_ORDER, HAS_BBIAS, PERMUTE, SOFTPLUS)
        y = tl.sum(hs * ct[None, :, :], 1)
        if HAS_D:
            y += dvec[:, None] * u
        if HAS_Z:
            z = tl.load(Z + row[:, None] + tok[None, :], mask=mask2, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(OUT + out_row[:, None] + tok[None, :], y.to(OUT.dtype.element_ty), mask=mask2)
        h = tl.sum(tl.where(last_step, hs, 0.0), 2)
    last_base = (b * tl.num_programs(2) + k).to(tl.int64) * dim * N
    tl.store(LAST + last_base + offs_d[:, None] * N + offs_n[None, :], h, mask=mask_dn)


@triton.jit
def _ss_bwd_kernel(
        DOUT, U, DELTA, A, Bm, Cm, Dv, Z, DBIAS, ORDERS, BBIAS, CHUNKS, DLAST,
        DU, DDELTA, DZ, DB_PART, DC_PART, DA_PART, DD_PART, DBIAS_PART,
        batch, dim, L, N, group_size, n_chunks,
        sb_b, sb_g, sb_n, sb_l, sc_b, sc_g, sc_n, sc_l,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ORDER: tl.constexpr,
        HAS_BBIAS: tl.constexpr, PERMUTE: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    k = tl.program_id(2)
    n_blocks = tl.num_programs(0)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    g = (pid_d * BLOCK_D) // group_size
    a = tl.load(A + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)
    a2 = a * 1.4426950408889634
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(DBIAS + offs_d, mask=mask_d, other=0.0)
    dvec = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        dvec = tl.load(Dv + offs_d, mask=mask_d, other=0.0)
    row = (b.to(tl.int64) * dim + offs_d) * L
    kb = (k * batch + b).to(tl.int64)
    grad_row = kb * dim * L + offs_d * L
    part_row = (kb * n_blocks + pid_d) * N * L + offs_n * L
    state_base = kb * n_chunks * dim * N
    steps = tl.arange(0, CHUNK)[None, None, :]
    if HAS_DLAST:
        last_base = (b * tl.num_programs(2) + k).to(tl.int64) * dim * N
        dlast = tl.load(DLAST + last_base + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)
    dh = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    da_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dd_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        h0 = tl.load(CHUNKS + state_base + c * dim * N + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn,
                     other=0.0)
        offs_t, mask2, mask_nt, tok, par, u, raw, dt, bt, ct, drive, hs = _chunk_scan(
            U, DELTA, Bm, Cm, ORDERS, BBIAS, h0, a2, bias, row, b, g, k, c, offs_n, mask_d, mask_n, L, N,
            sb_b, sb_g, sb_n, sb_l, sc_b, sc_g, sc_n, sc_l, CHUNK, HAS_BIAS, HAS_ORDER, HAS_BBIAS, PERMUTE, SOFTPLUS)
        dy = tl.load(DOUT + row[:, None] + tok[None, :], mask=mask2, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(Z + row[:, None] + tok[None, :], mask=mask2, other=0.0).to(tl.float32)
            y = tl.sum(hs * ct[None, :, :], 1)
            if HAS_D:
                y += dvec[:, None] * u
            sig = tl.sigmoid(z)
            tl.store(DZ + row[:, None] + tok[None, :], dy * y * sig * (1.0 + z * (1.0 - sig)), mask=mask2)
            dy = dy * z * sig
        # decay of the following step, a[t+1], read from memory (it may lie in the next chunk)
        offs_next = offs_t + 1
        mask_next = offs_next < L
        _, par_next = _step_tokens(ORDERS, k, offs_next, mask_next, L, HAS_ORDER, PERMUTE)
        _, dt_next = _load_dt(DELTA, row, par_next, mask_d[:, None] & mask_next[None, :], bias, HAS_BIAS, SOFTPLUS)
        decay_next = tl.where(mask_next[None, None, :], tl.exp2(dt_next[:, None, :] * a2[:, :, None]), 0.0)
        dh_local = ct[None, :, :] * dy[:, None, :]
        if HAS_DLAST:
            dh_local += tl.where((offs_t == L - 1)[None, None, :], dlast[:, :, None], 0.0)
        rev_a, rev_b = tl.associative_scan((decay_next, dh_local), 2, _combine, reverse=True)
        dhs = rev_b + rev_a * dh[:, :, None]
        dh = tl.sum(tl.where(steps == 0, dhs, 0.0), 2)
        prev = hs - drive  # a[t] * h[t-1]
        ddt = tl.sum(dhs * (prev * a[:, :, None] + u[:, None, :] * bt[None, :, :]), 1)
        du = tl.sum(dhs * bt[None, :, :], 1) * dt
        if HAS_D:
            du += dvec[:, None] * dy
            dd_acc += tl.sum(dy * u, 1)
        da_acc += tl.sum(dhs * prev * dt[:, None, :], 2)
        if SOFTPLUS:
            ddt = tl.where(raw <= 20.0, ddt * tl.sigmoid(raw), ddt)
        ddt = tl.where(mask2, ddt, 0.0)
        dbias_acc += tl.sum(ddt, 1)
        tl.store(DU + grad_row[:, None] + tok[None, :], du, mask=mask2)
        tl.store(DDELTA + grad_row[:, None] + par[None, :], ddt, mask=mask2)
        db = tl.sum(dhs * (dt * u)[:, None, :], 0)
        dc = tl.sum(hs * dy[:, None, :], 0)
        tl.store(DB_PART + part_row[:, None] + par[None, :], db, mask=mask_nt)
        tl.store(DC_PART + part_row[:, None] + par[None, :], dc, mask=mask_nt)
    param_base = kb * dim
    tl.store(DA_PART + (param_base + offs_d[:, None]) * N + offs_n[None, :], da_acc, mask=mask_dn)
    tl.store(DD_PART + param_base + offs_d, dd_acc, mask=mask_d)
    tl.store(DBIAS_PART + param_base + offs_d, dbias_acc, mask=mask_d)


def _bc_strides(m: Tensor) -> Tuple[int, int, int, int]:
    if m.dim() == 3:
        return m.stride(0), 0, m.stride(1), m.stride(2)
    return m.stride(0), m.stride(1), m.stride(2), m.stride(3)


def _setup(u, A, group_size, orders):
    batch, dim, length = u.shape
    block_d = _block_d(dim, group_size)
    k_dirs = 1 if orders is None else orders.shape[0]
    grid = (triton.cdiv(dim, block_d), batch, k_dirs)
    meta = dict(BLOCK_D=block_d, BLOCK_N=max(2, triton.next_power_of_2(A.shape[1])), CHUNK=CHUNK)
    return k_dirs, grid, meta


def _flags(D, z, delta_bias, orders, B_bias, softplus, permute_params):
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                HAS_ORDER=orders is not None, HAS_BBIAS=B_bias is not None, PERMUTE=permute_params,
                SOFTPLUS=softplus)


def _common_groups(B: Tensor, C: Tensor, dim: int) -> Tuple[Tensor, Tensor, int]:
    """B and C regrouped to the groups that lie inside one group of each (B and C may be grouped differently), so
    a program reads one group index; and the channels per such group."""
    group_size = math.gcd(*(dim if m.dim() == 3 else dim // m.shape[1] for m in (B, C)))
    return _regroup(B, dim, group_size), _regroup(C, dim, group_size), group_size


def ss_forward_triton(
        u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
        delta_bias: Optional[Tensor], orders: Optional[Tensor], B_bias: Optional[Tensor], softplus: bool,
        permute_params: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(out [batch, dim, L], last_state [batch, K, dim, N] float32, chunk start states)``."""
    u, delta = u.contiguous(), delta.contiguous()
    z = z.contiguous() if z is not None else None
    batch, dim, length = u.shape
    dstate = A.shape[1]
    B, C, group_size = _common_groups(B, C, dim)
    k_dirs, grid, meta = _setup(u, A, group_size, orders)
    n_chunks = chunk_count(length)
    out_k = u.new_empty(k_dirs, batch, dim, length)
    last = u.new_empty(batch, k_dirs, dim, dstate, dtype=torch.float32)
    chunks = u.new_empty(k_dirs, batch, n_chunks, dim, dstate, dtype=torch.float32)
    dummy = u.new_empty(0, dtype=torch.float32)
    opt = lambda t: t if t is not None else dummy  # noqa: E731
    _ss_fwd_kernel[grid](
        u, delta, A.contiguous(), B, C, opt(D), opt(z), opt(delta_bias), opt(orders), opt(B_bias), out_k, last,
        chunks, batch, dim, length, dstate, group_size, n_chunks, *_bc_strides(B), *_bc_strides(C),
        **meta, **_flags(D, z, delta_bias, orders, B_bias, softplus, permute_params))
    out = out_k[0] if k_dirs == 1 else out_k.sum(0)
    return out, last, chunks


def _regroup(m: Tensor, dim: int, group_size: int) -> Tensor:
    """``m`` with ``dim / group_size`` groups, each inside one of its own groups (one group stays 3-D)."""
    groups = dim // group_size
    if m.dim() == 3 and groups == 1:
        return m
    if m.dim() == 3:
        return m[:, None].expand(m.shape[0], groups, *m.shape[1:])
    if m.shape[1] == groups:
        return m
    rep = groups // m.shape[1]
    return m[:, :, None].expand(m.shape[0], m.shape[1], rep, *m.shape[2:]).reshape(m.shape[0], groups, *m.shape[2:])


def _fold_groups(part: Tensor, like: Tensor) -> Tensor:
    """Per-program partial sums ``[K, batch, blocks, N, L]`` -> the gradient of B or C in its own layout."""
    batch, n_blocks = part.shape[1], part.shape[2]
    per_group = part.sum(0)  # [batch, blocks, N, L]
    if like.dim() == 3:
        return per_group.sum(1)
    groups = like.shape[1]
    return per_group.reshape(batch, groups, n_blocks // groups, *per_group.shape[2:]).sum(2)


def ss_backward_triton(
        dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
        z: Optional[Tensor], delta_bias: Optional[Tensor], orders: Optional[Tensor], B_bias: Optional[Tensor],
        chunks: Tensor, dlast: Optional[Tensor], softplus: bool, permute_params: bool,
) -> Tuple[Tensor, ...]:
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dB_bias)``; absent inputs get empty tensors."""
    u, delta, dout = u.contiguous(), delta.contiguous(), dout.contiguous()
    z = z.contiguous() if z is not None else None
    batch, dim, length = u.shape
    dstate = A.shape[1]
    B_in, C_in = B, C
    B, C, group_size = _common_groups(B, C, dim)
    k_dirs, grid, meta = _setup(u, A, group_size, orders)
    n_blocks = grid[0]
    f32 = dict(dtype=torch.float32)
    du = u.new_empty(k_dirs, batch, dim, length, **f32)
    ddelta = u.new_empty(k_dirs, batch, dim, length, **f32)
    dz = torch.empty_like(u, **f32) if z is not None else None
    db_part = u.new_empty(k_dirs, batch, n_blocks, dstate, length, **f32)
    dc_part = u.new_empty(k_dirs, batch, n_blocks, dstate, length, **f32)
    da_part = u.new_empty(k_dirs, batch, dim, dstate, **f32)
    dd_part = u.new_empty(k_dirs, batch, dim, **f32)
    dbias_part = u.new_empty(k_dirs, batch, dim, **f32)
    dummy = u.new_empty(0, **f32)
    opt = lambda t: t if t is not None else dummy  # noqa: E731
    _ss_bwd_kernel[grid](
        dout, u, delta, A.contiguous(), B, C, opt(D), opt(z), opt(delta_bias), opt(orders), opt(B_bias), chunks,
        opt(dlast), du, ddelta, opt(dz), db_part, dc_part, da_part, dd_part, dbias_part,
        batch, dim, length, dstate, group_size, chunk_count(length), *_bc_strides(B), *_bc_strides(C),
        **meta, **_flags(D, z, delta_bias, orders, B_bias, softplus, permute_params), HAS_DLAST=dlast is not None)
    dB = _fold_groups(db_part, B_in).to(B_in.dtype)
    dC = _fold_groups(dc_part, C_in).to(C_in.dtype)
    empty = lambda: u.new_empty(0)  # noqa: E731  (custom-op outputs may not alias each other)
    dB_bias = empty()
    if B_bias is not None:
        per_step = db_part.sum((1, 2))  # [K, N, L] indexed like B
        if permute_params:  # B was read at token orders[k, t] at step t
            per_step = torch.gather(per_step, 2, orders.long()[:, None, :].expand_as(per_step))
        dB_bias = per_step.to(B_bias.dtype)
    return (du.sum(0).to(u.dtype), ddelta.sum(0).to(delta.dtype), da_part.sum((0, 1)).to(A.dtype), dB, dC,
            dd_part.sum((0, 1)).to(D.dtype) if D is not None else empty(),
            dz.to(z.dtype) if z is not None else empty(),
            dbias_part.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else empty(), dB_bias)
