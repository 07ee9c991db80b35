"""Shared benchmark machinery: the machine, timing, agreement checks before timing, rows and result files."""
import argparse
import dataclasses
import datetime
import gc
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from tqdm import tqdm

import visionmix

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS_DIR = REPO_ROOT / 'benchmarks' / 'results'
DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
MODES = ('fwd', 'fwdbwd')
# Largest ``max|out - expected| / max|expected|`` accepted before a baseline is declared wrong.
# fp32 allows for TF32 matmuls in GPU kernels.
AGREEMENT_TOL = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class Skip(Exception):
    """An implementation cannot run for this case on this machine; the message says why."""


@dataclasses.dataclass
class OpImpl:
    """A way to compute a case: ``fn(q, k, v)`` on inputs in ``layout``, returning the same layout.

    ``check(out, q, k, v) -> rel err`` marks a different operation (such as dense attention): its heads-last
    output is checked against its own reference, described by ``check_what``, and its gradients are not compared.
    """
    name: str
    fn: Optional[Callable] = None
    layout: str = 'heads_last'  # or 'heads_first': [B, heads, N, D]
    skip: Optional[str] = None
    no_backward: Optional[str] = None
    note: str = ''
    check: Optional[Callable] = None
    check_what: str = ''


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
# Timing and errors


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


_reported_skips = set()


def clear_reported_skips() -> None:
    _reported_skips.clear()


def report_skip(what: str, reason: str) -> None:
    """Print why something was not timed, once per distinct reason."""
    key = (what.split(' ')[0], reason)
    if key not in _reported_skips:
        _reported_skips.add(key)
        tqdm.write(f'skip {what}: {reason}', file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Agreement with visionmix, then timing. A case provides ``to_heads_first``, ``to_heads_last`` and ``row_fields``.


def inputs_by_layout(impls: Sequence[OpImpl], q, k, v, case) -> Dict[str, Tuple[torch.Tensor, ...]]:
    inputs = {'heads_last': (q, k, v)}
    if any(impl.layout == 'heads_first' for impl in impls):
        inputs['heads_first'] = tuple(case.to_heads_first(t) for t in (q, k, v))
    return inputs


def run_impl(impl: OpImpl, inputs: Sequence[torch.Tensor], case) -> torch.Tensor:
    """Forward of ``impl`` without autograd, returned heads-last."""
    with torch.no_grad():
        out = impl.fn(*inputs)
    return case.to_heads_last(out) if impl.layout == 'heads_first' else out


def visionmix_first(impls: Sequence[OpImpl]) -> List[OpImpl]:
    return sorted(impls, key=lambda impl: impl.name != 'visionmix')


def check_agreement(impls: List[OpImpl], q, k, v, case, dtype: torch.dtype) -> Dict[str, float]:
    """Run each implementation once and compare it with visionmix (or, with ``impl.check``, its own reference).

    Implementations that fail or disagree get a ``skip`` reason so they are never timed.
    """
    inputs = inputs_by_layout(impls, q, k, v, case)
    errors: Dict[str, float] = {}
    expected = None
    tol = AGREEMENT_TOL[dtype]
    for impl in visionmix_first(impls):
        if impl.skip:
            continue
        try:
            out = run_impl(impl, inputs[impl.layout], case)
        except Exception as err:
            impl.skip = describe_error(err)
            continue
        if impl.check is not None:
            err = impl.check(out, q, k, v)
            what = impl.check_what
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


def impl_gradients(impl: OpImpl, inputs: Sequence[torch.Tensor], grad_out: torch.Tensor, case):
    """``(dq, dk, dv)`` of ``impl`` for the heads-last cotangent ``grad_out``, returned heads-last."""
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
    out = impl.fn(*leaves)
    if impl.layout == 'heads_first':
        grad_out = case.to_heads_first(grad_out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    if impl.layout == 'heads_first':
        grads = tuple(case.to_heads_last(g) for g in grads)
    return grads


def check_gradient_agreement(impls: List[OpImpl], q, k, v, case, dtype: torch.dtype) -> Dict[str, float]:
    """Compare every implementation's dq/dk/dv with visionmix's (largest of the three errors); one that
    disagrees or fails gets a ``no_backward`` reason so its backward is never timed."""
    inputs = {'heads_last': (q, k, v), 'heads_first': tuple(case.to_heads_first(t) for t in (q, k, v))}
    generator = torch.Generator(device='cpu').manual_seed(1)
    grad_out = torch.randn(q.shape[:-1] + v.shape[-1:], generator=generator).to(device=q.device, dtype=q.dtype)
    errors: Dict[str, float] = {}
    expected = None
    tol = AGREEMENT_TOL[dtype]
    for impl in visionmix_first(impls):
        if impl.skip or impl.no_backward or impl.check is not None:  # a different operation: no gradients to match
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


def benchmark_case(case, impls: List[OpImpl], q, k, v, args, device: torch.device,
                   dtype: torch.dtype) -> List[dict]:
    """Check every implementation against visionmix, then time the ones that agree: one row per impl and mode."""
    errors = {'fwd': check_agreement(impls, q, k, v, case, dtype)}
    if 'fwdbwd' in args.modes:
        errors['fwdbwd'] = check_gradient_agreement(impls, q, k, v, case, dtype)
    inputs = inputs_by_layout(impls, q, k, v, case)
    rows = []
    for mode in args.modes:
        for impl in impls:
            row = dict(case.row_fields(), mode=mode, impl=impl.name, latency_ms=None, throughput=None,
                       peak_mib=None, rel_err=errors[mode].get(impl.name), ratio=None, status='ok', note=impl.note)
            reason = impl.skip or (impl.no_backward if mode == 'fwdbwd' else None)
            if reason is None:
                try:
                    step = make_step(impl, inputs[impl.layout], mode)
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
    return rows


def build_impls(builders: Dict[str, Callable[[], OpImpl]], names: Sequence[str]) -> List[OpImpl]:
    """Build the requested implementations; one that fails to build carries the error as its ``skip``."""
    impls = []
    for name in names:
        try:
            impls.append(builders[name]())
        except Exception as err:  # a baseline failing to build must not stop the others
            impls.append(OpImpl(name, skip=describe_error(err)))
    return impls


def random_inputs(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    """q, k, v from a fixed seed, drawn on the CPU so every device gets the same numbers."""
    generator = torch.Generator(device='cpu').manual_seed(0)
    return tuple(torch.randn(tuple(shape), generator=generator).to(device=device, dtype=dtype) for _ in range(3))


# ----------------------------------------------------------------------------------------------------------------
# Command-line helpers


def parse_dims(text: str, flag: str, parser: argparse.ArgumentParser) -> Tuple[int, ...]:
    try:
        dims = tuple(int(x) for x in text.lower().split('x'))
    except ValueError:
        parser.error(f'{flag} takes integers joined by "x" (e.g. 7 or 3x7x7), got {text!r}')
    if any(d < 1 for d in dims):
        parser.error(f'{flag} values must be positive, got {text!r}')
    return dims


def default_batch(args) -> int:
    on_cuda = args.device.type == 'cuda'
    if args.model is not None:
        return 64 if on_cuda else 2
    return 8 if on_cuda else 1


def result_header(args, kind: str, title: str) -> dict:
    return dict(
        kind=kind, title=title, device=args.device.type, device_name=device_name(args.device),
        dtype=args.dtype, modes=list(args.modes), iters=args.iters, warmup=args.warmup,
        threads=torch.get_num_threads(),
        versions=dict(torch=torch.__version__, timm=timm.__version__, visionmix=visionmix.__version__,
                      python=platform.python_version()),
        timestamp=datetime.datetime.now().isoformat(timespec='seconds'), notes=list(args.notes),
        argv=[str(a) for a in (args.argv or [])])


# ----------------------------------------------------------------------------------------------------------------
# Reporting


@dataclasses.dataclass
class Table:
    """Markdown columns of one kind of result: the leading ``(header, cell(row))`` pairs, then the timed ones."""
    lead: List[Tuple[str, Callable[[dict], str]]]
    throughput: str = 'tokens/s'


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


def join_dims(dims: Sequence[int]) -> str:
    return 'x'.join(map(str, dims))


def markdown_table(rows: List[dict], table: Table) -> str:
    """The results as a markdown table; skipped rows keep their reason in ``note``."""
    header = [name for name, _ in table.lead] + ['latency (ms)', table.throughput, 'peak (MiB)', 'rel err', 'ratio',
                                                 'note']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    for r in rows:
        cells = [cell(r) for _, cell in table.lead]
        cells += [format_number(r['latency_ms'], '.3f'), format_si(r['throughput']),
                  format_number(r['peak_mib'], '.1f'), format_number(r['rel_err'], '.1e'),
                  format_number(r['ratio'], '.2f'), r['note'].replace('|', '/')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def markdown_report(result: dict, table: Table) -> str:
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
                     'visionmix runs its PyTorch reference, or its Triton kernels in Triton\'s interpreter where '
                     'asked to. Only GPU runs, with the device named, count.')
    lines += [f'- note: {note}' for note in result['notes']]
    lines += ['', markdown_table(result['rows'], table), '']
    return '\n'.join(lines)


def plot_latency(result: dict, path: Path) -> None:
    """Grouped bars of latency per case (or model) and implementation, one panel per mode, log scale."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    key = 'model' if result['kind'] == 'model' else 'case'
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


def write_results(result: dict, out_dir: Path, stem: str, table: Table) -> Dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f'{stem}.{ext}' for ext in ('json', 'md', 'png')}
    paths['md'].write_text(markdown_report(result, table))
    plot_latency(result, paths['png'])
    files = {ext: str(p) for ext, p in paths.items()}
    paths['json'].write_text(json.dumps({**result, 'files': files}, indent=2) + '\n')
    return files
