"""Whole timm-registered models (``--model PATTERN``): visionmix as is, and with every op on its PyTorch reference."""
import argparse
import contextlib
import math
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
from tqdm import tqdm

from .common import (
    DTYPES,
    Table,
    add_ratios,
    default_batch,
    describe_error,
    format_number,
    free_memory,
    join_dims,
    median_latency_ms,
    peak_memory_mib,
    relative_error,
    report_skip,
    result_header,
)

IMPLS = ('visionmix', 'visionmix-ref')
# Whole-model logits accumulate rounding over depth; this only has to catch wrong kernels.
MODEL_AGREEMENT_TOL = {torch.float32: 2e-2, torch.float16: 1e-1, torch.bfloat16: 1e-1}
TABLE = Table([('model', lambda r: r['model']), ('input', lambda r: join_dims(r['input_size'])),
               ('batch', lambda r: str(r['batch'])), ('params (M)', lambda r: f"{r['params_m']:.2f}"),
               ('GFLOPs', lambda r: format_number(r['gflops'], '.2f')), ('mode', lambda r: r['mode']),
               ('impl', lambda r: r['impl'])], throughput='img/s')


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


def run(args, parser: argparse.ArgumentParser) -> Tuple[dict, str]:
    """Benchmark every registered model matching ``args.model``; returns the result and file stem."""
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
