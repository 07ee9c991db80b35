#!/usr/bin/env python3
"""Benchmark visionmix operators and models, side by side with baselines in one run.

Ops (neighborhood attention against SDPA, flex attention and NATTEN)::

    python tools/benchmark.py --op na2d --mode both --dtype bf16
    python tools/benchmark.py --op na2d --shape 1x56x56x2x32 --kernel-size 7 --dilation 4

Models registered with timm (``import visionmix`` registers the visionmix ones)::

    python tools/benchmark.py --model nat_mini --mode both --batch 64
    python tools/benchmark.py --model 'dinat_*' --img-size 384
    python tools/benchmark.py --list-models

Results are printed as a markdown table and written as ``.json``, ``.md`` and ``.png`` under
``benchmarks/results/<device>/`` (``--out-dir`` overrides). See ``benchmarks/README.md``.
"""
import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import visionmix  # noqa: E402
from visionmix.kernels import na1d, na2d, na3d  # noqa: E402
from visionmix.kernels.neighborhood.reference import neighbourhood_mask  # noqa: E402

OPS = {'na1d': na1d, 'na2d': na2d, 'na3d': na3d}
DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
MODES = ('fwd', 'fwdbwd')
OP_IMPLS = ('visionmix', 'visionmix-ref', 'sdpa-dense', 'sdpa-masked', 'flex', 'natten')
MODEL_IMPLS = ('visionmix', 'visionmix-ref')
# Largest ``max|out - expected| / max|expected|`` accepted before a baseline is declared wrong.
# fp32 allows for TF32 matmuls in GPU kernels.
AGREEMENT_TOL = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# Whole-model logits accumulate rounding over depth; this only has to catch wrong kernels.
MODEL_AGREEMENT_TOL = {torch.float32: 2e-2, torch.float16: 1e-1, torch.bfloat16: 1e-1}
DENSE_CHECK_ROWS = 256
DEFAULT_RESULTS_DIR = REPO_ROOT / 'benchmarks' / 'results'


class Skip(Exception):
    """An implementation cannot run for this case on this machine; the message says why."""


@dataclasses.dataclass
class OpCase:
    """One neighborhood-attention problem: heads-last tensors ``[batch, *spatial, heads, head_dim]``."""
    name: str
    spatial: Tuple[int, ...]
    kernel_size: Tuple[int, ...]
    dilation: Tuple[int, ...]
    heads: int
    head_dim: int
    batch: int
    is_causal: bool = False

    @property
    def rank(self) -> int:
        return len(self.spatial)

    @property
    def seq_len(self) -> int:
        return math.prod(self.spatial)

    @property
    def shape(self) -> Tuple[int, ...]:
        return (self.batch, *self.spatial, self.heads, self.head_dim)

    def label(self) -> str:
        return 'x'.join(str(x) for x in self.shape)


@dataclasses.dataclass
class OpImpl:
    """A way to compute the case: ``fn(q, k, v)`` on inputs in ``layout``, returning the same layout."""
    name: str
    fn: Optional[Callable] = None
    layout: str = 'heads_last'  # or 'heads_first': [B, heads, N, D]
    skip: Optional[str] = None
    no_backward: Optional[str] = None
    note: str = ''


# ----------------------------------------------------------------------------------------------------------------
# Default cases


def default_op_cases(op: str, batch: int) -> List[OpCase]:
    """NAT/DiNAT stage shapes at 224/384/512 px (kernel 7, head dim 32 as in NAT, plus 64 and 128),
    long 1-D sequences and 3-D video volumes."""
    if op == 'na1d':
        return [
            OpCase('seq-3136-k49', (3136,), (49,), (1,), 2, 32, batch),
            OpCase('seq-16384-k49', (16384,), (49,), (1,), 2, 32, batch),
            OpCase('seq-16384-k49-hd64', (16384,), (49,), (1,), 4, 64, batch),
            OpCase('seq-16384-k49-hd128', (16384,), (49,), (1,), 4, 128, batch),
            OpCase('seq-3136-k49-dil8', (3136,), (49,), (8,), 2, 32, batch),
        ]
    if op == 'na3d':
        return [
            OpCase('video-16x32x32-k7', (16, 32, 32), (7, 7, 7), (1, 1, 1), 4, 32, batch),
            OpCase('video-16x32x32-k7-hd64', (16, 32, 32), (7, 7, 7), (1, 1, 1), 4, 64, batch),
            OpCase('video-16x32x32-k7-hd128', (16, 32, 32), (7, 7, 7), (1, 1, 1), 4, 128, batch),
            OpCase('video-8x28x28-k3x7x7', (8, 28, 28), (3, 7, 7), (1, 1, 1), 4, 32, batch),
            OpCase('video-8x28x28-k3x7x7-dil2', (8, 28, 28), (3, 7, 7), (1, 2, 2), 4, 32, batch),
        ]
    return [
        OpCase('nat-224-stage1', (56, 56), (7, 7), (1, 1), 2, 32, batch),
        OpCase('nat-224-stage2', (28, 28), (7, 7), (1, 1), 4, 32, batch),
        OpCase('nat-224-stage3', (14, 14), (7, 7), (1, 1), 8, 32, batch),
        OpCase('nat-384-stage1', (96, 96), (7, 7), (1, 1), 2, 32, batch),
        OpCase('nat-384-stage2', (48, 48), (7, 7), (1, 1), 4, 32, batch),
        OpCase('nat-512-stage1', (128, 128), (7, 7), (1, 1), 2, 32, batch),
        OpCase('nat-512-stage2', (64, 64), (7, 7), (1, 1), 4, 32, batch),
        OpCase('nat-224-stage1-hd64', (56, 56), (7, 7), (1, 1), 2, 64, batch),
        OpCase('nat-224-stage1-hd128', (56, 56), (7, 7), (1, 1), 2, 128, batch),
        OpCase('dinat-224-stage1-dil8', (56, 56), (7, 7), (8, 8), 2, 32, batch),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Machine


def device_name(device: torch.device) -> str:
    """GPU name from CUDA, or the CPU model from /proc/cpuinfo."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'cpu'


def device_slug(device: torch.device) -> str:
    """Folder name for results: ``cpu``, or the GPU name such as ``nvidia-h100-80gb-hbm3``."""
    if device.type != 'cuda':
        return 'cpu'
    return re.sub(r'[^a-z0-9]+', '-', device_name(device).lower()).strip('-') or 'cuda'


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# Timing


def median_latency_ms(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Median time of one ``step()`` in ms over ``iters`` calls: CUDA events around each call on GPU, the
    wall clock around each call on CPU.

    ``torch.utils.benchmark.Timer`` only reports per-block means, and its ``timeit`` adds two untimed calls
    per measurement, which would triple CPU run times for per-call medians.
    """
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == 'cuda':
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends):
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        times_ms = [start.elapsed_time(end) for start, end in zip(starts, ends)]
    else:
        times_ms = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times_ms.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times_ms)


def peak_memory_mib(step: Callable[[], None], device: torch.device) -> Optional[float]:
    """Peak allocated CUDA memory during one ``step()`` in MiB, inputs included; None off CUDA."""
    if device.type != 'cuda':
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|out - expected| / max|expected|`` in float32."""
    out, expected = out.float(), expected.float()
    return ((out - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def describe_error(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ''
    return f'{type(err).__name__}: {text[:200]}' if not isinstance(err, Skip) else text


# ----------------------------------------------------------------------------------------------------------------
# Op implementations


def to_heads_first(x: torch.Tensor, rank: int) -> torch.Tensor:
    """``[B, *spatial, H, D]`` -> contiguous ``[B, H, N, D]``."""
    return x.flatten(1, rank).transpose(1, 2).contiguous()


def to_heads_last(x: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, *spatial, H, D]`` (a view)."""
    return x.transpose(1, 2).unflatten(1, tuple(spatial))


def make_visionmix(case: OpCase, op: str, backend: str) -> OpImpl:
    op_fn = OPS[op]
    name = 'visionmix' if backend == 'auto' else 'visionmix-ref'

    def fn(q, k, v):
        return op_fn(q, k, v, case.kernel_size, dilation=case.dilation, is_causal=case.is_causal, backend=backend)
    return OpImpl(name, fn)


def make_sdpa_dense(case: OpCase) -> OpImpl:
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)
    return OpImpl('sdpa-dense', fn, layout='heads_first', note='all tokens, no mask (upper bound)')


def make_sdpa_masked(case: OpCase, mask: torch.Tensor) -> OpImpl:
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return OpImpl('sdpa-masked', fn, layout='heads_first')


def make_flex(case: OpCase, mask: torch.Tensor, device: torch.device, with_flex: bool) -> OpImpl:
    if device.type == 'cpu' and not with_flex:
        return OpImpl('flex', skip='on CPU compiling flex_attention costs ~20 s per shape; pass --with-flex')
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        return OpImpl('flex', skip=f'flex_attention unavailable ({err})')

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[q_idx, kv_idx]

    torch._dynamo.reset()  # one compiled graph per case; avoids the recompile limit across many shapes
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=case.seq_len, KV_LEN=case.seq_len,
                                   device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v):
        return compiled(q, k, v, block_mask=block_mask)
    no_backward = 'flex_attention has no backward on CPU' if device.type == 'cpu' else None
    return OpImpl('flex', fn, layout='heads_first', no_backward=no_backward,
                  note=f'block sparsity {block_mask.sparsity():.0f}%')


def make_natten(case: OpCase) -> OpImpl:
    try:
        import natten
    except ImportError as err:
        return OpImpl('natten', skip=f'natten is not installed ({err})')
    name = f'na{case.rank}d'
    op_fn = getattr(natten, name, None) or getattr(getattr(natten, 'functional', None), name, None)
    if op_fn is None:
        return OpImpl('natten', skip=f'natten {getattr(natten, "__version__", "?")} has no {name}')

    def fn(q, k, v):
        return op_fn(q, k, v, kernel_size=case.kernel_size, dilation=case.dilation, is_causal=case.is_causal)
    return OpImpl('natten', fn, note=f'natten {getattr(natten, "__version__", "")}'.strip())


def build_op_impls(case: OpCase, op: str, device: torch.device, names: Sequence[str], with_flex: bool) -> List[OpImpl]:
    """Every requested implementation for ``case``; those that cannot run carry a ``skip`` reason."""
    mask = None
    if {'sdpa-masked', 'flex'} & set(names):
        mask = neighbourhood_mask(case.spatial, case.kernel_size, (1,) * case.rank, case.dilation,
                                  (case.is_causal,) * case.rank, device)
    builders = {
        'visionmix': lambda: make_visionmix(case, op, 'auto'),
        'visionmix-ref': lambda: make_visionmix(case, op, 'torch'),
        'sdpa-dense': lambda: make_sdpa_dense(case),
        'sdpa-masked': lambda: make_sdpa_masked(case, mask),
        'flex': lambda: make_flex(case, mask, device, with_flex),
        'natten': lambda: make_natten(case),
    }
    impls = []
    for name in names:
        try:
            impls.append(builders[name]())
        except Exception as err:  # a baseline failing to build must not stop the others
            impls.append(OpImpl(name, skip=describe_error(err)))
    return impls


def make_op_inputs(case: OpCase, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    generator = torch.Generator(device='cpu').manual_seed(0)
    return tuple(torch.randn(case.shape, generator=generator).to(device=device, dtype=dtype) for _ in range(3))


def dense_attention_rows(q, k, v, rows: torch.Tensor, rank: int) -> torch.Tensor:
    """Plain softmax attention over all tokens for query ``rows`` of batch 0: ``[R, H, D]`` in float32."""
    qf = q[:1].flatten(1, rank)[0, rows].float()
    kf, vf = (t[:1].flatten(1, rank)[0].float() for t in (k, v))
    scores = torch.einsum('rhd,nhd->hrn', qf, kf) * q.shape[-1] ** -0.5
    return torch.einsum('hrn,nhd->rhd', scores.softmax(-1), vf)


def run_impl(impl: OpImpl, inputs: Sequence[torch.Tensor], case: OpCase) -> torch.Tensor:
    """Forward of ``impl`` without autograd, returned heads-last."""
    with torch.no_grad():
        out = impl.fn(*inputs)
    return to_heads_last(out, case.spatial) if impl.layout == 'heads_first' else out


def check_agreement(impls: List[OpImpl], q, k, v, case: OpCase, dtype: torch.dtype) -> Dict[str, float]:
    """Run each implementation once and compare it with visionmix (sdpa-dense with plain dense attention).

    Implementations that fail or disagree get a ``skip`` reason so they are never timed.
    """
    inputs = {'heads_last': (q, k, v)}
    if any(impl.layout == 'heads_first' for impl in impls):
        inputs['heads_first'] = tuple(to_heads_first(t, case.rank) for t in (q, k, v))
    errors: Dict[str, float] = {}
    expected = None
    tol = AGREEMENT_TOL[dtype]
    ordered = sorted(impls, key=lambda impl: impl.name != 'visionmix')  # visionmix first: it is the reference
    for impl in ordered:
        if impl.skip:
            continue
        try:
            out = run_impl(impl, inputs[impl.layout], case)
        except Exception as err:
            impl.skip = describe_error(err)
            continue
        if impl.name == 'sdpa-dense':
            rows = torch.linspace(0, case.seq_len - 1, min(DENSE_CHECK_ROWS, case.seq_len), device=q.device).long()
            want = dense_attention_rows(q, k, v, rows, case.rank)
            err = relative_error(out[:1].flatten(1, case.rank)[0, rows], want)
            what = 'dense attention'
        elif expected is None:
            expected = out  # visionmix, or the first one to run if visionmix could not
            continue
        else:
            err = relative_error(out, expected)
            what = 'visionmix'
        errors[impl.name] = err
        if not math.isfinite(err) or err > tol:
            impl.skip = f'output disagrees with {what}: rel err {err:.2e} > {tol:.0e}; not timed'
        del out
    return errors


def impl_gradients(impl: OpImpl, inputs: Sequence[torch.Tensor], grad_out: torch.Tensor, case: OpCase):
    """``(dq, dk, dv)`` of ``impl`` for the heads-last cotangent ``grad_out``, returned heads-last."""
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
    out = impl.fn(*leaves)
    if impl.layout == 'heads_first':
        grad_out = to_heads_first(grad_out, case.rank)
    grads = torch.autograd.grad(out, leaves, grad_out)
    if impl.layout == 'heads_first':
        grads = tuple(to_heads_last(g, case.spatial) for g in grads)
    return grads


def check_gradient_agreement(impls: List[OpImpl], q, k, v, case: OpCase, dtype: torch.dtype) -> Dict[str, float]:
    """Compare every implementation's dq/dk/dv with visionmix's (largest of the three errors); one that
    disagrees or fails gets a ``no_backward`` reason so its backward is never timed."""
    inputs = {'heads_last': (q, k, v), 'heads_first': tuple(to_heads_first(t, case.rank) for t in (q, k, v))}
    generator = torch.Generator(device='cpu').manual_seed(1)
    grad_out = torch.randn(q.shape, generator=generator).to(device=q.device, dtype=q.dtype)
    errors: Dict[str, float] = {}
    expected = None
    tol = AGREEMENT_TOL[dtype]
    for impl in sorted(impls, key=lambda impl: impl.name != 'visionmix'):
        if impl.skip or impl.no_backward or impl.name == 'sdpa-dense':  # sdpa-dense is a different operation
            continue
        try:
            grads = impl_gradients(impl, inputs[impl.layout], grad_out, case)
        except Exception as err:
            impl.no_backward = describe_error(err)
            continue
        if expected is None:
            expected = grads
            continue
        err = max(relative_error(g, e) for g, e in zip(grads, expected))
        errors[impl.name] = err
        if not math.isfinite(err) or err > tol:
            impl.no_backward = f'gradients disagree with visionmix: rel err {err:.2e} > {tol:.0e}; not timed'
    return errors


def make_step(impl: OpImpl, inputs: Sequence[torch.Tensor], mode: str) -> Callable[[], None]:
    """The timed call: forward without autograd, or forward plus backward to all inputs."""
    if mode == 'fwd':
        def step():
            with torch.no_grad():
                impl.fn(*inputs)
        return step
    leaves = tuple(t.detach().requires_grad_(True) for t in inputs)
    with torch.no_grad():
        grad_out = torch.randn_like(impl.fn(*inputs))

    def step():
        out = impl.fn(*leaves)
        torch.autograd.grad(out, leaves, grad_out)
    return step


def benchmark_op_case(case: OpCase, op: str, args, device: torch.device, dtype: torch.dtype) -> List[dict]:
    """All rows (implementations x modes) for one case."""
    impls = build_op_impls(case, op, device, args.impls, args.with_flex)
    q, k, v = make_op_inputs(case, device, dtype)
    errors = {'fwd': check_agreement(impls, q, k, v, case, dtype)}
    if 'fwdbwd' in args.modes:
        errors['fwdbwd'] = check_gradient_agreement(impls, q, k, v, case, dtype)
    heads_first = tuple(to_heads_first(t, case.rank) for t in (q, k, v))
    rows = []
    for mode in args.modes:
        for impl in impls:
            row = dict(case=case.name, shape=case.label(), batch=case.batch, spatial=list(case.spatial),
                       kernel_size=list(case.kernel_size), dilation=list(case.dilation), is_causal=case.is_causal,
                       heads=case.heads, head_dim=case.head_dim, tokens=case.batch * case.seq_len, mode=mode,
                       impl=impl.name, latency_ms=None, throughput=None, peak_mib=None,
                       rel_err=errors[mode].get(impl.name), ratio=None, status='ok', note=impl.note)
            reason = impl.skip or (impl.no_backward if mode == 'fwdbwd' else None)
            if reason is None:
                inputs = heads_first if impl.layout == 'heads_first' else (q, k, v)
                try:
                    step = make_step(impl, inputs, mode)
                    row['latency_ms'] = median_latency_ms(step, device, args.warmup, args.iters)
                    row['peak_mib'] = peak_memory_mib(step, device)
                    row['throughput'] = row['tokens'] / (row['latency_ms'] / 1e3)
                except Exception as err:
                    reason = describe_error(err)
                    free_memory(device)
            if reason is not None:
                row.update(status='skipped', note=reason)
                report_skip(f'{impl.name} [{case.name} {mode}]', reason)
            rows.append(row)
    del q, k, v, heads_first, impls
    free_memory(device)
    return rows


_reported_skips = set()


def report_skip(what: str, reason: str) -> None:
    """Print why something was not timed, once per distinct reason."""
    key = (what.split(' ')[0], reason)
    if key not in _reported_skips:
        _reported_skips.add(key)
        tqdm.write(f'skip {what}: {reason}', file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Models


def visionmix_models() -> List[str]:
    """Every timm model whose entrypoint lives in the visionmix package."""
    return sorted(name for name in timm.list_models()
                  if timm.models.model_entrypoint(name).__module__.startswith('visionmix.'))


def is_visionmix_model(name: str) -> bool:
    return timm.models.model_entrypoint(name).__module__.startswith('visionmix.')


def create_model(name: str, img_size: Optional[int], device='cpu'):
    """``timm.create_model`` without weights; ``img_size`` is passed only to models that take it."""
    if img_size is not None:
        try:
            return timm.create_model(name, pretrained=False, img_size=img_size).to(device)
        except TypeError:
            pass
    return timm.create_model(name, pretrained=False).to(device)


def count_gflops(name: str, input_size: Sequence[int], img_size: Optional[int]) -> Tuple[Optional[float], str]:
    """Forward FLOPs per image (2 per multiply-add) counted on a meta-device copy; None when that fails."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with torch.device('meta'):
            model = create_model(name, img_size, device='meta').eval()
            x = torch.empty(1, *input_size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        return counter.get_total_flops() / 1e9, ''
    except Exception as err:
        return None, f'GFLOPs not counted ({describe_error(err)})'


@contextlib.contextmanager
def visionmix_backend(backend: str):
    """Force the backend every visionmix op with ``backend='auto'`` uses (see ``VISIONMIX_BACKEND``)."""
    old = os.environ.get('VISIONMIX_BACKEND')
    os.environ['VISIONMIX_BACKEND'] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop('VISIONMIX_BACKEND', None)
        else:
            os.environ['VISIONMIX_BACKEND'] = old


def autocast_context(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_model_step(model, x: torch.Tensor, mode: str, device: torch.device, dtype: torch.dtype):
    """Inference forward in eval mode, or a train-mode forward and backward of the mean output."""
    if mode == 'fwd':
        model.eval()

        def step():
            with torch.no_grad(), autocast_context(device, dtype):
                model(x)
        return step
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        with autocast_context(device, dtype):
            out = model(x)
        out.float().mean().backward()
    return step


def model_ref_skip_reason(name: str, device: torch.device) -> Optional[str]:
    if not is_visionmix_model(name):
        return 'not a visionmix model'
    if device.type != 'cuda':
        return 'same code as visionmix here: backend auto already runs the PyTorch reference off CUDA'
    return None


def benchmark_model(name: str, args, device: torch.device, dtype: torch.dtype) -> List[dict]:
    """Rows (implementations x modes) for one registered model."""
    torch.manual_seed(0)
    model = create_model(name, args.img_size, device)
    input_size = tuple(model.pretrained_cfg.get('input_size', (3, 224, 224)))
    if args.img_size is not None:
        input_size = (input_size[0], args.img_size, args.img_size)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    gflops, gflops_note = count_gflops(name, input_size, args.img_size)
    if gflops_note:
        report_skip(f'gflops [{name}]', gflops_note)
    x = torch.randn(args.batch, *input_size, device=device)

    backends = {'visionmix': 'auto', 'visionmix-ref': 'torch'}
    skips = {impl: None for impl in args.impls}
    if 'visionmix-ref' in skips:
        skips['visionmix-ref'] = model_ref_skip_reason(name, device)
    errors: Dict[str, float] = {}
    expected = None
    for impl in args.impls:
        if skips[impl]:
            continue
        try:
            model.eval()
            with visionmix_backend(backends[impl]), torch.no_grad(), autocast_context(device, dtype):
                out = model(x[:1])
        except Exception as err:
            skips[impl] = describe_error(err)
            continue
        if expected is None:
            expected = out
            continue
        errors[impl] = relative_error(out, expected)
        if not math.isfinite(errors[impl]) or errors[impl] > MODEL_AGREEMENT_TOL[dtype]:
            skips[impl] = f'output disagrees with visionmix: rel err {errors[impl]:.2e}; not timed'

    rows = []
    for mode in args.modes:
        for impl in args.impls:
            row = dict(model=name, input_size=list(input_size), batch=args.batch, params_m=params_m, gflops=gflops,
                       mode=mode, impl=impl, latency_ms=None, throughput=None, peak_mib=None,
                       rel_err=errors.get(impl), ratio=None, status='ok', note=gflops_note)
            reason = skips[impl]
            if reason is None:
                try:
                    with visionmix_backend(backends[impl]):
                        step = make_model_step(model, x, mode, device, dtype)
                        row['latency_ms'] = median_latency_ms(step, device, args.warmup, args.iters)
                        row['peak_mib'] = peak_memory_mib(step, device)
                    row['throughput'] = args.batch / (row['latency_ms'] / 1e3)
                except Exception as err:
                    reason = describe_error(err)
                    free_memory(device)
            if reason is not None:
                row.update(status='skipped', note=reason)
                report_skip(f'{impl} [{name} {mode}]', reason)
            rows.append(row)
    del model, x
    free_memory(device)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def add_ratios(rows: List[dict], key: str) -> None:
    """``ratio`` = latency / visionmix latency for the same ``key`` (case or model) and mode."""
    base = {(r[key], r['mode']): r['latency_ms'] for r in rows if r['impl'] == 'visionmix' and r['latency_ms']}
    for row in rows:
        ref = base.get((row[key], row['mode']))
        if ref and row['latency_ms']:
            row['ratio'] = row['latency_ms'] / ref


def format_si(value: Optional[float]) -> str:
    if value is None:
        return 'n/a'
    for factor, suffix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(value) >= factor:
            return f'{value / factor:.2f}{suffix}'
    return f'{value:.1f}'


def format_number(value: Optional[float], spec: str) -> str:
    return 'n/a' if value is None else format(value, spec)


def markdown_table(rows: List[dict], kind: str) -> str:
    """The results as a markdown table; skipped rows keep their reason in ``note``."""
    if kind == 'op':
        header = ['case', 'shape', 'kernel', 'dilation', 'mode', 'impl', 'latency (ms)', 'tokens/s', 'peak (MiB)',
                  'rel err', 'ratio', 'note']
    else:
        header = ['model', 'input', 'batch', 'params (M)', 'GFLOPs', 'mode', 'impl', 'latency (ms)', 'img/s',
                  'peak (MiB)', 'rel err', 'ratio', 'note']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    for r in rows:
        timed = [format_number(r['latency_ms'], '.3f'), format_si(r['throughput']),
                 format_number(r['peak_mib'], '.1f'), format_number(r['rel_err'], '.1e'),
                 format_number(r['ratio'], '.2f'), r['note'].replace('|', '/')]
        if kind == 'op':
            cells = [r['case'], r['shape'], 'x'.join(map(str, r['kernel_size'])), 'x'.join(map(str, r['dilation'])),
                     r['mode'], r['impl']] + timed
        else:
            cells = [r['model'], 'x'.join(map(str, r['input_size'])), str(r['batch']), f"{r['params_m']:.2f}",
                     format_number(r['gflops'], '.2f'), r['mode'], r['impl']] + timed
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def markdown_report(result: dict) -> str:
    """Header naming the device and method, then the table."""
    lines = [f"# {result['title']}", '',
             f"- device: {result['device_name']} ({result['device']}, {result['threads']} CPU threads)",
             f"- dtype: {result['dtype']}; modes: {', '.join(result['modes'])}",
             f"- torch {result['versions']['torch']}, timm {result['versions']['timm']}, "
             f"visionmix {result['versions']['visionmix']}; {result['timestamp']}",
             f"- latency: median over {result['iters']} iterations after {result['warmup']} warmup; "
             'ratio = latency / visionmix latency, measured side by side in this run',
             ]
    if result['device'] == 'cpu':
        lines.append('- **CPU run: absolute numbers are not meaningful here.** The kernels target GPUs; on CPU '
                     'visionmix runs its PyTorch reference. Only GPU runs, with the device named, count.')
    lines += [f'- note: {note}' for note in result['notes']]
    lines += ['', markdown_table(result['rows'], result['kind']), '']
    return '\n'.join(lines)


def plot_latency(result: dict, path: Path) -> None:
    """Grouped bars of latency per case (or model) and implementation, one panel per mode, log scale."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    key = 'case' if result['kind'] == 'op' else 'model'
    rows = [r for r in result['rows'] if r['latency_ms']]
    modes = list(result['modes'])
    fig, axes = plt.subplots(1, len(modes), figsize=(max(6.0, 1.6 * len({r[key] for r in rows}) + 3) * len(modes),
                                                     4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        mode_rows = [r for r in rows if r['mode'] == mode]
        groups = list(dict.fromkeys(r[key] for r in mode_rows))
        impls = list(dict.fromkeys(r['impl'] for r in mode_rows))
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            latency = {r[key]: r['latency_ms'] for r in mode_rows if r['impl'] == impl}
            xs = [g + (i - (len(impls) - 1) / 2) * width for g in range(len(groups)) if groups[g] in latency]
            ax.bar(xs, [latency[g] for g in groups if g in latency], width, label=impl)
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha='right', fontsize=8)
        ax.set_yscale('log')
        ax.set_ylabel('latency (ms, log scale)')
        ax.set_title(mode)
        ax.grid(axis='y', which='both', alpha=0.3)
        if impls:
            ax.legend(fontsize=8)
    fig.suptitle(f"{result['title']} on {result['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: dict, out_dir: Path, stem: str) -> Dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f'{stem}.{ext}' for ext in ('json', 'md', 'png')}
    paths['md'].write_text(markdown_report(result))
    plot_latency(result, paths['png'])
    files = {ext: str(p) for ext, p in paths.items()}
    paths['json'].write_text(json.dumps({**result, 'files': files}, indent=2) + '\n')
    return files


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_dims(text: str, flag: str, parser: argparse.ArgumentParser) -> Tuple[int, ...]:
    try:
        dims = tuple(int(x) for x in text.lower().split('x'))
    except ValueError:
        parser.error(f'{flag} takes integers joined by "x" (e.g. 7 or 3x7x7), got {text!r}')
    if any(d < 1 for d in dims):
        parser.error(f'{flag} values must be positive, got {text!r}')
    return dims


def per_axis(dims: Tuple[int, ...], rank: int, flag: str, parser: argparse.ArgumentParser) -> Tuple[int, ...]:
    if len(dims) == 1:
        return dims * rank
    if len(dims) != rank:
        parser.error(f'{flag} needs 1 or {rank} values for this op, got {len(dims)}')
    return dims


def custom_op_case(args, parser: argparse.ArgumentParser) -> OpCase:
    """The one case described by ``--shape`` (spatial dims, or the full ``BxSPATIALxHxD`` shape) and friends."""
    rank = int(args.op[2])
    dims = parse_dims(args.shape, '--shape', parser)
    batch, heads, head_dim = args.batch, args.heads, args.head_dim
    if len(dims) == rank + 3:
        given = [flag for flag, value in (('--batch', args.batch), ('--heads', args.heads),
                                          ('--head-dim', args.head_dim)) if value is not None]
        if given:
            parser.error(f'--shape {args.shape} already sets batch, heads and head_dim; drop {", ".join(given)}')
        batch, spatial, heads, head_dim = dims[0], dims[1:-2], dims[-2], dims[-1]
    elif len(dims) == rank:
        spatial = dims
    else:
        parser.error(f'--shape for {args.op} takes {rank} spatial dims or the full shape of {rank + 3} dims '
                     f'(batch x spatial x heads x head_dim), got {args.shape!r}')
    kernel_size = per_axis(parse_dims(args.kernel_size or '7', '--kernel-size', parser), rank, '--kernel-size', parser)
    dilation = per_axis(parse_dims(args.dilation or '1', '--dilation', parser), rank, '--dilation', parser)
    name = 'x'.join(map(str, spatial)) + '-k' + 'x'.join(map(str, kernel_size))
    if any(d > 1 for d in dilation):
        name += '-dil' + 'x'.join(map(str, dilation))
    if args.causal:
        name += '-causal'
    return OpCase(name, spatial, kernel_size, dilation, heads or 4, head_dim or 32,
                  batch or default_batch(args), args.causal)


def validate_op_case(case: OpCase, op: str, parser: argparse.ArgumentParser) -> None:
    """Let visionmix check the arguments on meta tensors so a bad case fails before any timing."""
    q = torch.empty(case.shape, device='meta')
    try:
        OPS[op](q, q, q, case.kernel_size, dilation=case.dilation, is_causal=case.is_causal, backend='torch')
    except ValueError as err:
        parser.error(f'case {case.name}: {err}')


def default_batch(args) -> int:
    on_cuda = args.device.type == 'cuda'
    if args.model is not None:
        return 64 if on_cuda else 2
    return 8 if on_cuda else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Benchmark visionmix ops or timm-registered models against baselines, side by side.')
    what = parser.add_mutually_exclusive_group()
    what.add_argument('--op', choices=sorted(OPS), help='operator to benchmark (default na2d)')
    what.add_argument('--model', help="registered model name or wildcard, e.g. nat_mini or 'dinat_*'")
    what.add_argument('--list-models', action='store_true', help='print the visionmix models and exit')
    parser.add_argument('--mode', choices=('fwd', 'fwdbwd', 'both'), default='fwd',
                        help='forward only, forward+backward, or both (default fwd)')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default=None,
                        help='default bf16 on CUDA, fp32 on CPU (fp16 falls back to fp32 on CPU)')
    parser.add_argument('--device', default=None, help='default cuda when available, else cpu')
    parser.add_argument('--iters', type=int, default=None, help='timed iterations (default 50 on CUDA, 10 on CPU)')
    parser.add_argument('--warmup', type=int, default=None, help='untimed calls first (default 10 on CUDA, 2 on CPU)')
    parser.add_argument('--batch', type=int, default=None,
                        help='batch size (ops: 8 on CUDA, 1 on CPU; models: 64 on CUDA, 2 on CPU)')
    parser.add_argument('--impls', default=None,
                        help=f"comma-separated subset of implementations (ops: {','.join(OP_IMPLS)}; "
                             f"models: {','.join(MODEL_IMPLS)})")
    parser.add_argument('--with-flex', action='store_true', help='include flex attention on CPU (slow to compile)')
    parser.add_argument('--out-dir', type=Path, default=None,
                        help='where to write json/md/png (default benchmarks/results/<device>)')
    case = parser.add_argument_group('custom op case (replaces the default cases)')
    case.add_argument('--shape', help='spatial dims (56x56) or the full heads-last shape (8x56x56x2x32)')
    case.add_argument('--kernel-size', help='kernel size, one value or one per axis (default 7)')
    case.add_argument('--dilation', help='dilation, one value or one per axis (default 1)')
    case.add_argument('--heads', type=int, default=None, help='heads (default 4)')
    case.add_argument('--head-dim', type=int, default=None, help='head dim (default 32)')
    case.add_argument('--causal', action='store_true', help='causal along every axis')
    model = parser.add_argument_group('models')
    model.add_argument('--img-size', type=int, default=None, help="input size (default pretrained_cfg['input_size'])")
    return parser


def resolve_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse and fill in device-dependent defaults; argument errors exit through ``parser.error``."""
    args = parser.parse_args(argv)
    if args.op is None and args.model is None:
        args.op = 'na2d'
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        args.device = torch.device(device)
    except RuntimeError as err:
        parser.error(f'--device {device!r}: {err}')
    if args.device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda requested but CUDA is not available')
    if args.device.type not in ('cuda', 'cpu'):
        parser.error(f'--device must be cuda or cpu, got {device!r}')
    on_cuda = args.device.type == 'cuda'
    args.notes = []
    args.dtype = args.dtype or ('bf16' if on_cuda else 'fp32')
    if args.dtype == 'fp16' and not on_cuda:
        args.notes.append('fp16 requested on CPU; running fp32 instead')
        args.dtype = 'fp32'
    args.iters = args.iters if args.iters is not None else (50 if on_cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 2)
    if args.iters < 1:
        parser.error('--iters must be >= 1')
    if args.warmup < 1:
        parser.error('--warmup must be >= 1 so compilation and autotuning stay out of the timings')
    if args.batch is not None and args.batch < 1:
        parser.error('--batch must be >= 1')
    args.modes = MODES if args.mode == 'both' else (args.mode,)
    known = OP_IMPLS if args.model is None else MODEL_IMPLS
    if args.impls is None:
        args.impls = list(known)
    else:
        args.impls = list(dict.fromkeys(name.strip() for name in args.impls.split(',') if name.strip()))
        unknown = [name for name in args.impls if name not in known]
        if unknown or not args.impls:
            parser.error(f'--impls takes a subset of {", ".join(known)}, got {unknown or args.impls}')
    if args.model is not None:
        custom = [flag for flag, value in (('--shape', args.shape), ('--kernel-size', args.kernel_size),
                                           ('--dilation', args.dilation), ('--heads', args.heads),
                                           ('--head-dim', args.head_dim)) if value is not None]
        if custom or args.causal:
            parser.error(f'{", ".join(custom or ["--causal"])}: only for op cases, not with --model')
    elif args.shape is None:
        custom = [flag for flag, value in (('--kernel-size', args.kernel_size), ('--dilation', args.dilation),
                                           ('--heads', args.heads), ('--head-dim', args.head_dim)) if value]
        if custom or args.causal:
            parser.error(f'{", ".join(custom or ["--causal"])}: only for a custom case, which needs --shape')
    return args


def result_header(args, kind: str, title: str) -> dict:
    return dict(
        kind=kind, title=title, device=args.device.type, device_name=device_name(args.device),
        dtype=args.dtype, modes=list(args.modes), iters=args.iters, warmup=args.warmup,
        threads=torch.get_num_threads(),
        versions=dict(torch=torch.__version__, timm=timm.__version__, visionmix=visionmix.__version__,
                      python=platform.python_version()),
        timestamp=datetime.datetime.now().isoformat(timespec='seconds'), notes=list(args.notes),
        argv=[str(a) for a in (args.argv or [])])


def run_op_benchmark(args, parser) -> Tuple[dict, str]:
    if args.shape is not None:
        cases = [custom_op_case(args, parser)]
    else:
        cases = default_op_cases(args.op, args.batch or default_batch(args))
    for case in cases:
        validate_op_case(case, args.op, parser)
    dtype = DTYPES[args.dtype]
    rows = []
    for case in tqdm(cases, desc=f'{args.op} {args.mode} {args.dtype}', unit='case', file=sys.stderr):
        rows += benchmark_op_case(case, args.op, args, args.device, dtype)
    add_ratios(rows, 'case')
    result = result_header(args, 'op', f'{args.op} {args.mode} {args.dtype}')
    result.update(op=args.op, rows=rows)
    stem = f'{args.op}_{args.mode}_{args.dtype}'
    if args.shape is not None:
        stem += f'_{cases[0].name}'
    return result, stem


def run_model_benchmark(args, parser) -> Tuple[dict, str]:
    names = timm.list_models(args.model)
    if not names:
        known = ', '.join(visionmix_models()) or 'none registered yet'
        parser.error(f'no registered model matches {args.model!r} (visionmix models: {known})')
    args.batch = args.batch or default_batch(args)
    dtype = DTYPES[args.dtype]
    if dtype != torch.float32:
        args.notes.append(f'models run under torch.autocast({args.dtype})')
    rows = []
    for name in tqdm(names, desc=f'models {args.mode} {args.dtype}', unit='model', file=sys.stderr):
        rows += benchmark_model(name, args, args.device, dtype)
    add_ratios(rows, 'model')
    result = result_header(args, 'model', f'{args.model} {args.mode} {args.dtype}')
    result.update(model=args.model, rows=rows)
    pattern = re.sub(r'[^A-Za-z0-9_.-]+', '-', args.model.replace('*', 'all')).strip('-')
    return result, f'model_{pattern}_{args.mode}_{args.dtype}'


def main(argv=None) -> dict:
    """Run the benchmark described by ``argv`` (``sys.argv[1:]`` when None); returns the results written."""
    parser = build_parser()
    args = resolve_args(parser, argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.list_models:
        names = visionmix_models()
        print('\n'.join(names) if names else 'no visionmix models are registered')
        return dict(kind='list', models=names)
    _reported_skips.clear()
    for note in args.notes:
        print(f'note: {note}', file=sys.stderr)
    if args.model is not None:
        result, stem = run_model_benchmark(args, parser)
    else:
        result, stem = run_op_benchmark(args, parser)
    out_dir = args.out_dir or DEFAULT_RESULTS_DIR / device_slug(args.device)
    result['files'] = write_results(result, Path(out_dir), stem)
    print(markdown_report(result))
    print('wrote ' + ', '.join(result['files'].values()))
    return result


if __name__ == '__main__':
    main()
