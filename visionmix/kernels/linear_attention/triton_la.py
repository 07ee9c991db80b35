"""Global linear attention in Triton: forward and backward, two passes each.

Forward: ``_la_summary_kernel`` reduces a chunk of keys to partial ``S = sum w k_num v^T``,
``z = sum w phi(k)`` and ``sum v`` (chunks summed afterwards in a fixed order), then
``_la_readout_kernel`` reads each query out against the summary, fused with the feature map, the
rotary embedding and the form's normalisation. Backward mirrors it: ``_la_bwd_query_kernel`` writes
``dq`` and reduces ``dS``, ``dz``, ``d vbar`` (and the temperature's gradient) over queries, and
``_la_bwd_key_kernel`` turns them into ``dk``, ``dv`` and the key weights' gradient. No atomics:
results are bitwise reproducible.
"""
import torch
import triton
import triton.language as tl

from .._backend import interpreter_mode

FORM_IDS = {'normalized': 0, 'mala': 1, 'inline': 2, 'l2vit': 3}
FEATURE_IDS = {'identity': 0, 'relu': 1, 'elu1': 2}
_BLOCK_N = 64


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    if FEATURE == 1:
        return tl.maximum(x, 0.0)
    elif FEATURE == 2:
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:
        return x


@triton.jit
def _dphi(x, FEATURE: tl.constexpr):
    if FEATURE == 1:
        return tl.where(x > 0, 1.0, 0.0)
    elif FEATURE == 2:
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:
        return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def _rotate_pairs(x, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)`` along the last axis."""
    even, odd = tl.split(tl.reshape(x, (ROWS, BLOCK_D // 2, 2)))
    return tl.reshape(tl.join(-odd, even), (ROWS, BLOCK_D))


@triton.jit
def _coefficients(den, tau, c, eps, floor, FORM: tl.constexpr):
    """Readout ``out = a * num + b * vbar`` and the derivatives ``da/dden``, ``db/dden``."""
    if FORM == 0:
        r = 1.0 / (c * den + eps)
        a = c * r
        da = -c * c * r * r
        b = tl.zeros_like(den)
        db = tl.zeros_like(den)
    elif FORM == 1:
        r = 1.0 / (c * den + eps)
        a = c * (1.0 + r)
        da = -c * c * r * r
        b = -c * den
        db = tl.full(den.shape, -1.0, tl.float32) * c
    elif FORM == 2:
        a = tl.full(den.shape, 1.0, tl.float32) * c
        da = tl.zeros_like(den)
        b = 1.0 - c * den
        db = tl.full(den.shape, -1.0, tl.float32) * c
    else:
        m = tl.maximum(den, floor)
        a = tau / m
        da = tl.where(den >= floor, -tau / (m * m), 0.0)
        b = tl.zeros_like(den)
        db = tl.zeros_like(den)
    return a, da, b, db


@triton.jit
def _load_rows(ptr, offs_n, offs_c, stride_n, n_rows, n_cols):
    mask = (offs_n[:, None] < n_rows) & (offs_c[None, :] < n_cols)
    return tl.load(ptr + offs_n[:, None] * stride_n + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _la_summary_kernel(
        Kt, V, W, COS, SIN, S_PART, Z_PART, VSUM_PART,
        sk_b, sk_n, sk_h, sv_b, sv_n, sv_h, sw_b, sw_n, sw_h,
        N, H, D, DV,
        FEATURE: tl.constexpr, HAS_W: tl.constexpr, HAS_ROPE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    valid = offs_n < N
    kf = _phi(_load_rows(Kt + b * sk_b + h * sk_h, offs_n, offs_d, sk_n, N, D), FEATURE)
    kf = tl.where(valid[:, None] & (offs_d[None, :] < D), kf, 0.0)  # phi(0) = 1 for elu1: padding must not count
    v = _load_rows(V + b * sv_b + h * sv_h, offs_n, offs_dv, sv_n, N, DV)
    if HAS_W:
        w = tl.load(W + b * sw_b + h * sw_h + offs_n * sw_n, mask=valid, other=0.0).to(tl.float32)
        kf = kf * w[:, None]
    k_num = kf
    if HAS_ROPE:
        cos = _load_rows(COS, offs_n, offs_d, D, N, D)
        sin = _load_rows(SIN, offs_n, offs_d, D, N, D)
        k_num = kf * cos + _rotate_pairs(kf, BLOCK_N, BLOCK_D) * sin
    s = tl.dot(tl.trans(k_num), v, input_precision=PRECISION)
    base = bh * tl.num_programs(1) + chunk
    tl.store(S_PART + base * BLOCK_D * BLOCK_DV + offs_d[:, None] * BLOCK_DV + offs_dv[None, :], s)
    tl.store(Z_PART + base * BLOCK_D + offs_d, tl.sum(kf, 0))
    tl.store(VSUM_PART + base * BLOCK_DV + offs_dv, tl.sum(v, 0))


@triton.jit
def _la_readout_kernel(
        Q, S, Z, VMEAN, COS, SIN, TAU, Out,
        sq_b, sq_n, sq_h, so_b, so_n, so_h,
        N, H, D, DV, c, eps, floor,
        FORM: tl.constexpr, FEATURE: tl.constexpr, HAS_ROPE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qf = _phi(_load_rows(Q + b * sq_b + h * sq_h, offs_n, offs_d, sq_n, N, D), FEATURE)
    qf = tl.where(offs_d[None, :] < D, qf, 0.0)
    q_num = qf
    if HAS_ROPE:
        cos = _load_rows(COS, offs_n, offs_d, D, N, D)
        sin = _load_rows(SIN, offs_n, offs_d, D, N, D)
        q_num = qf * cos + _rotate_pairs(qf, BLOCK_N, BLOCK_D) * sin
    s = tl.load(S + bh * BLOCK_D * BLOCK_DV + offs_d[:, None] * BLOCK_DV + offs_dv[None, :])
    z = tl.load(Z + bh * BLOCK_D + offs_d)
    vmean = tl.load(VMEAN + bh * BLOCK_DV + offs_dv)
    tau = 1.0
    if FORM == 3:
        tau = tl.load(TAU + h).to(tl.float32)
    num = tl.dot(q_num, s, input_precision=PRECISION)
    den = tl.sum(qf * z[None, :], 1)
    a, _, bcoef, _ = _coefficients(den, tau, c, eps, floor, FORM)
    out = a[:, None] * num + bcoef[:, None] * vmean[None, :]
    mask = (offs_n[:, None] < N) & (offs_dv[None, :] < DV)
    tl.store(Out + b * so_b + h * so_h + offs_n[:, None] * so_n + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=mask)


@triton.jit
def _la_bwd_query_kernel(
        Q, DO, S, Z, VMEAN, COS, SIN, TAU, DQ, DS_PART, DZ_PART, DVM_PART, DTAU_PART,
        sq_b, sq_n, sq_h, so_b, so_n, so_h,
        N, H, D, DV, c, eps, floor,
        FORM: tl.constexpr, FEATURE: tl.constexpr, HAS_ROPE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dq`` of a chunk of queries (dq shares q's strides) and the chunk's partial ``dS``, ``dz``,
    ``d vbar`` and ``d tau``."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    valid = offs_n < N
    q_raw = _load_rows(Q + b * sq_b + h * sq_h, offs_n, offs_d, sq_n, N, D)
    qf = tl.where(valid[:, None] & (offs_d[None, :] < D), _phi(q_raw, FEATURE), 0.0)
    q_num = qf
    if HAS_ROPE:
        cos = _load_rows(COS, offs_n, offs_d, D, N, D)
        sin = _load_rows(SIN, offs_n, offs_d, D, N, D)
        q_num = qf * cos + _rotate_pairs(qf, BLOCK_N, BLOCK_D) * sin
    do = _load_rows(DO + b * so_b + h * so_h, offs_n, offs_dv, so_n, N, DV)
    s = tl.load(S + bh * BLOCK_D * BLOCK_DV + offs_d[:, None] * BLOCK_DV + offs_dv[None, :])
    z = tl.load(Z + bh * BLOCK_D + offs_d)
    vmean = tl.load(VMEAN + bh * BLOCK_DV + offs_dv)
    tau = 1.0
    if FORM == 3:
        tau = tl.load(TAU + h).to(tl.float32)
    num = tl.dot(q_num, s, input_precision=PRECISION)
    den = tl.sum(qf * z[None, :], 1)
    a, da_dden, bcoef, db_dden = _coefficients(den, tau, c, eps, floor, FORM)
    grad_a = tl.sum(do * num, 1)
    grad_b = tl.sum(do * vmean[None, :], 1)
    dden = tl.where(valid, da_dden * grad_a + db_dden * grad_b, 0.0)
    dnum = a[:, None] * do
    dq_num = tl.dot(dnum, tl.trans(s), input_precision=PRECISION)
    dqf = dq_num
    if HAS_ROPE:
        # transpose of the rotation: rotate_pairs^T = -rotate_pairs
        dqf = dq_num * cos - _rotate_pairs(dq_num * sin, BLOCK_N, BLOCK_D)
    dqf += dden[:, None] * z[None, :]
    dq = dqf * _dphi(q_raw, FEATURE)
    mask = valid[:, None] & (offs_d[None, :] < D)
    tl.store(DQ + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=mask)
    base = bh * tl.num_programs(1) + chunk
    ds = tl.dot(tl.trans(q_num), dnum, input_precision=PRECISION)
    tl.store(DS_PART + base * BLOCK_D * BLOCK_DV + offs_d[:, None] * BLOCK_DV + offs_dv[None, :], ds)
    tl.store(DZ_PART + base * BLOCK_D + offs_d, tl.sum(dden[:, None] * qf, 0))
    tl.store(DVM_PART + base * BLOCK_DV + offs_dv, tl.sum(bcoef[:, None] * do, 0))
    if FORM == 3:
        tl.store(DTAU_PART + base, tl.sum(tl.where(valid, grad_a / tl.maximum(den, floor), 0.0), 0))


@triton.jit
def _la_bwd_key_kernel(
        Kt, V, W, COS, SIN, DS, DZ, DVM, DK, DV_, DW,
        sk_b, sk_n, sk_h, sv_b, sv_n, sv_h, sw_b, sw_n, sw_h,
        N, H, D, DV, inv_n,
        FEATURE: tl.constexpr, HAS_W: tl.constexpr, HAS_ROPE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dk``, ``dv`` (sharing k's and v's strides) and ``dw`` of a chunk of keys."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    valid = offs_n < N
    k_raw = _load_rows(Kt + b * sk_b + h * sk_h, offs_n, offs_d, sk_n, N, D)
    kf = tl.where(valid[:, None] & (offs_d[None, :] < D), _phi(k_raw, FEATURE), 0.0)
    v = _load_rows(V + b * sv_b + h * sv_h, offs_n, offs_dv, sv_n, N, DV)
    k_num = kf
    if HAS_ROPE:
        cos = _load_rows(COS, offs_n, offs_d, D, N, D)
        sin = _load_rows(SIN, offs_n, offs_d, D, N, D)
        k_num = kf * cos + _rotate_pairs(kf, BLOCK_N, BLOCK_D) * sin
    ds = tl.load(DS + bh * BLOCK_D * BLOCK_DV + offs_d[:, None] * BLOCK_DV + offs_dv[None, :])
    dz = tl.load(DZ + bh * BLOCK_D + offs_d)
    dvm = tl.load(DVM + bh * BLOCK_DV + offs_dv)
    w = tl.full([BLOCK_N], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + b * sw_b + h * sw_h + offs_n * sw_n, mask=valid, other=0.0).to(tl.float32)
    g_num = tl.dot(v, tl.trans(ds), input_precision=PRECISION)  # d(w k_num) = dS v
    dv = tl.dot(k_num * w[:, None], ds, input_precision=PRECISION) + dvm[None, :] * inv_n
    dkf = g_num
    if HAS_ROPE:
        dkf = g_num * cos - _rotate_pairs(g_num * sin, BLOCK_N, BLOCK_D)
    dk = (dkf * w[:, None] + dz[None, :] * w[:, None]) * _dphi(k_raw, FEATURE)
    tl.store(DK + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=valid[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=valid[:, None] & (offs_dv[None, :] < DV))
    if HAS_W:
        dw = tl.sum(k_num * g_num, 1) + tl.sum(kf * dz[None, :], 1)
        tl.store(DW + b * sw_b + h * sw_h + offs_n * sw_n, dw.to(DW.dtype.element_ty), mask=valid)


def _meta(q, v):
    D, DV = q.shape[-1], v.shape[-1]
    return dict(BLOCK_N=_BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(D)),
                BLOCK_DV=max(16, triton.next_power_of_2(DV)),
                PRECISION='ieee' if q.dtype == torch.float32 else 'tf32')


def _num_warps():
    return 1 if interpreter_mode() else 4


def _rope_tables(rope, q):
    if rope is None:
        return q, q, False
    return rope[0].float().contiguous(), rope[1].float().contiguous(), True


def la_forward_triton(q, k, v, w, rope, tau, form, feature_map, c, eps, floor):
    """Launch the forward; arguments already validated. Returns ``(out, S, z, vmean)`` (fp32 summaries,
    padded to the kernels' power-of-two head dims)."""
    B, Nq, H, D = q.shape
    Nk, DV = k.shape[1], v.shape[-1]
    meta = _meta(q, v)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cos, sin, has_rope = _rope_tables(rope, q)
    chunks = triton.cdiv(Nk, _BLOCK_N)
    bd, bdv = meta['BLOCK_D'], meta['BLOCK_DV']
    s_part = torch.empty(B * H, chunks, bd, bdv, device=q.device, dtype=torch.float32)
    z_part = torch.empty(B * H, chunks, bd, device=q.device, dtype=torch.float32)
    vsum_part = torch.empty(B * H, chunks, bdv, device=q.device, dtype=torch.float32)
    w_arg = w if w is not None else q
    w_strides = w.stride() if w is not None else (0, 0, 0)
    _la_summary_kernel[(B * H, chunks)](
        k, v, w_arg, cos, sin, s_part, z_part, vsum_part,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), *w_strides,
        Nk, H, D, DV, FEATURE=FEATURE_IDS[feature_map], HAS_W=w is not None, HAS_ROPE=has_rope,
        num_warps=_num_warps(), **meta)
    summary, z, vmean = s_part.sum(1), z_part.sum(1), vsum_part.sum(1) / Nk
    out = q.new_empty(B, Nq, H, DV)
    _la_readout_kernel[(B * H, triton.cdiv(Nq, _BLOCK_N))](
        q, summary, z, vmean, cos, sin, tau if tau is not None else q, out,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        Nq, H, D, DV, c, eps, floor, FORM=FORM_IDS[form], FEATURE=FEATURE_IDS[feature_map], HAS_ROPE=has_rope,
        num_warps=_num_warps(), **meta)
    return out, summary, z, vmean


def la_backward_triton(dout, q, k, v, w, rope, tau, summary, z, vmean, form, feature_map, c, eps, floor):
    """Launch the backward. Returns ``(dq, dk, dv, dw or None, dtau or None)``."""
    B, Nq, H, D = q.shape
    Nk, DV = k.shape[1], v.shape[-1]
    meta = _meta(q, v)
    q, k, v = (t.contiguous() for t in (q, k, v))
    dout = dout.to(q.dtype).contiguous()
    cos, sin, has_rope = _rope_tables(rope, q)
    bd, bdv = meta['BLOCK_D'], meta['BLOCK_DV']
    q_chunks = triton.cdiv(Nq, _BLOCK_N)
    ds_part = torch.empty(B * H, q_chunks, bd, bdv, device=q.device, dtype=torch.float32)
    dz_part = torch.empty(B * H, q_chunks, bd, device=q.device, dtype=torch.float32)
    dvm_part = torch.empty(B * H, q_chunks, bdv, device=q.device, dtype=torch.float32)
    dtau_part = torch.zeros(B * H, q_chunks, device=q.device, dtype=torch.float32)
    dq = torch.empty_like(q)
    _la_bwd_query_kernel[(B * H, q_chunks)](
        q, dout, summary, z, vmean, cos, sin, tau if tau is not None else q, dq, ds_part, dz_part, dvm_part, dtau_part,
        q.stride(0), q.stride(1), q.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        Nq, H, D, DV, c, eps, floor, FORM=FORM_IDS[form], FEATURE=FEATURE_IDS[feature_map], HAS_ROPE=has_rope,
        num_warps=_num_warps(), **meta)
    ds, dz, dvm = ds_part.sum(1).contiguous(), dz_part.sum(1).contiguous(), dvm_part.sum(1).contiguous()
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dw = torch.empty(B, Nk, H, device=q.device, dtype=w.dtype) if w is not None else None
    w_arg = w.contiguous() if w is not None else q
    w_strides = w_arg.stride() if w is not None else (0, 0, 0)
    _la_bwd_key_kernel[(B * H, triton.cdiv(Nk, _BLOCK_N))](
        k, v, w_arg, cos, sin, ds, dz, dvm, dk, dv, dw if dw is not None else q,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), *w_strides,
        Nk, H, D, DV, 1.0 / Nk, FEATURE=FEATURE_IDS[feature_map], HAS_W=w is not None, HAS_ROPE=has_rope,
        num_warps=_num_warps(), **meta)
    dtau = dtau_part.view(B, H, q_chunks).sum((0, 2)).to(tau.dtype) if tau is not None else None
    return dq, dk, dv, dw, dtau
