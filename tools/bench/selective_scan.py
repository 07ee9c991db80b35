"""Selective-scan cases (``--op selective_scan``) for ``visionmix.kernels.selective_scan`` and its baselines: the
sequential PyTorch reference, one ``selective_scan`` call per scan direction, and mamba-ssm's CUDA kernel
(``selective_scan_fn``) when it is installed and runs.

Cases are in mamba-ssm's layout (``u``/``delta`` ``[batch, dim, L]``, ``A`` ``[dim, N]``, ``B``/``C``
``[batch, N, L]``, ``D`` and ``delta_bias`` ``[dim]``, softplus on ``delta``). VCMamba's Mamba layers scan the
token map in four snake orders (``visionmix.models.vcmamba.scan_orders``) with ``delta``/``B``/``C`` read at the
step index and a direction vector added to ``B`` at every step: visionmix runs the four in one
``selective_scan_multidir`` launch, the baselines run four scans over permuted ``u`` and sum the outputs put back
in token order, as VCMamba's original code does with mamba-ssm. Language-model cases are one scan gated by ``z``.

The inputs have many tensors, so this op has its own agreement checks and timing loop (same rules as
``common.benchmark_case``): every implementation runs once and is compared with visionmix, output and every
gradient, by relative RMS error; one that fails or disagrees is reported with the reason and not timed.
"""
import argparse
import dataclasses
import fnmatch
import math
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from visionmix.kernels._backend import interpreter_mode, resolve_backend
from visionmix.kernels.selective_scan import check_args, selective_scan, selective_scan_multidir
from visionmix.kernels.testing import rel_rms_error

from .common import (
    AGREEMENT_TOL,
    DTYPES,
    OpImpl,
    Table,
    add_ratios,
    build_impls,
    default_batch,
    describe_error,
    free_memory,
    join_dims,
    median_latency_ms,
    parse_dims,
    peak_memory_mib,
    report_skip,
    result_header,
    visionmix_first,
)

IMPLS = ('visionmix', 'visionmix-ref', 'visionmix-loop', 'mamba-ssm')
DIRECTIONS = 4  # VCMamba: row snake, its reverse, column snake, its reverse
DEFAULT_D_STATE = 16
# Largest directions * batch * dim * N * L for the PyTorch reference, which materialises the decay and input terms
# of every step in float32 and, for backward, every state.
REFERENCE_MAX_ELEMENTS = {'cuda': 2 ** 31, 'cpu': 2 ** 26}
# d_inner = 2 x the stage-4 width (288 / 448 / 512) of VCMamba-S/M/B; the stage-4 token map at 224 and 512 px.
VCMAMBA_DIMS = {'s': 576, 'm': 896, 'b': 1024}
VCMAMBA_GRIDS = {224: (7, 7), 512: (16, 16)}
# d_inner = 2 x d_model of Mamba-130M (768) and Mamba-370M (1024)
MAMBA_LM_DIMS = {'130m': 1536, '370m': 2048}
MAMBA_LM_LENGTH = 2048
TABLE = Table([('case', lambda r: r['case']), ('model', lambda r: r['model']), ('shape', lambda r: r['shape']),
               ('N', lambda r: str(r['d_state'])), ('dirs', lambda r: str(r['directions'])),
               ('z', lambda r: 'yes' if r['gate'] else 'no'), ('mode', lambda r: r['mode']),
               ('impl', lambda r: r['impl'])])


@dataclasses.dataclass
class ScanCase:
    """One selective-scan problem: ``[batch, dim, L]`` inputs, state size ``d_state``, with ``D``, ``delta_bias``
    and softplus. With ``grid`` (H, W) it is a VCMamba layer: four snake scans of the ``H x W`` token map, a
    direction vector added to ``B`` per step, summed; otherwise one scan, gated by ``z`` when ``gate``."""
    name: str
    batch: int
    dim: int
    d_state: int
    seq_len: int = 0
    grid: Optional[Tuple[int, int]] = None
    gate: bool = False
    model: str = ''

    def __post_init__(self):
        if self.grid is not None:
            self.grid = tuple(self.grid)
            self.seq_len = self.grid[0] * self.grid[1]

    @property
    def directions(self) -> int:
        return 1 if self.grid is None else DIRECTIONS

    def label(self) -> str:
        return join_dims((self.batch, self.dim, self.seq_len))

    def scan_orders(self, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """VCMamba's ``(orders, codes)``, each ``[4, L]``: the token read at each step of each direction and the
        move (0 start, 1 right, 2 left, 3 up, 4 down) that reached it."""
        from visionmix.models.vcmamba import scan_orders  # only the multi-direction cases need the model module
        return scan_orders(*self.grid, device=device)

    def row_fields(self) -> dict:
        return dict(case=self.name, model=self.model, shape=self.label(), batch=self.batch, dim=self.dim,
                    d_state=self.d_state, seq_len=self.seq_len, grid=None if self.grid is None else list(self.grid),
                    directions=self.directions, gate=self.gate, tokens=self.batch * self.seq_len)


def default_scan_cases(device: torch.device, batch: int) -> List[ScanCase]:
    """The GPU set on CUDA, tiny versions elsewhere (the Triton interpreter runs them in seconds).

    GPU: VCMamba-S/M/B Mamba layers (d_inner 576 / 896 / 1024, N 16) at 224 px (7x7 tokens) and 512 px (16x16),
    four directions; Mamba-130M / -370M language-model layers (d_inner 1536 / 2048, N 16, L 2048, with z and D).
    CPU: a 4x4 token map in four directions and a 32-step gated scan, dim 8, N 4.
    """
    if device.type == 'cuda':
        cases = [ScanCase(f'vcmamba-{variant}-{px}', batch, dim, DEFAULT_D_STATE, grid=grid,
                          model=f'VCMamba-{variant.upper()} {px} px')
                 for px, grid in VCMAMBA_GRIDS.items() for variant, dim in VCMAMBA_DIMS.items()]
        return cases + [ScanCase(f'mamba-{size}-l{MAMBA_LM_LENGTH}', batch, dim, DEFAULT_D_STATE, MAMBA_LM_LENGTH,
                                 gate=True, model=f'Mamba-{size.upper()}') for size, dim in MAMBA_LM_DIMS.items()]
    return [ScanCase('vcmamba-tiny-4x4', batch, 8, 4, grid=(4, 4), model='VCMamba-like'),
            ScanCase('mamba-tiny-l32', batch, 8, 4, 32, gate=True, model='Mamba-LM-like')]


def make_scan_inputs(case: ScanCase, device: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Inputs from a fixed seed, drawn on the CPU: u, delta, B, C (and z) in ``dtype``; A, D, delta_bias (and B_bias)
    in float32 as Mamba keeps its parameters. A is S4D-real ``-(1..N)``, delta_bias the inverse softplus of steps
    log-uniform in [1e-3, 1e-1] (Mamba's dt init); B_bias is a direction vector per step from 5 random vectors, as
    VCMamba's ``direction_Bs[codes]``."""
    generator = torch.Generator(device='cpu').manual_seed(0)
    batch, dim, n, length = case.batch, case.dim, case.d_state, case.seq_len

    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=generator) * scale

    dt = torch.exp(torch.rand(dim, generator=generator) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
    inputs = dict(u=randn(batch, dim, length), delta=randn(batch, dim, length, scale=0.5),
                  A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1), B=randn(batch, n, length),
                  C=randn(batch, n, length), D=torch.ones(dim), delta_bias=dt + torch.log(-torch.expm1(-dt)))
    if case.gate:
        inputs['z'] = randn(batch, dim, length)
    if case.grid is not None:
        _, codes = case.scan_orders('cpu')
        inputs['B_bias'] = randn(5, n, scale=0.02)[codes].transpose(-1, -2).contiguous()  # [4, N, L]
    low = ('u', 'delta', 'B', 'C', 'z')
    return {k: v.to(device=device, dtype=dtype if k in low else torch.float32) for k, v in inputs.items()}


# ----------------------------------------------------------------------------------------------------------------
# Implementations: ``fn(inputs) -> out [batch, dim, L]`` on the dict of ``make_scan_inputs``


def reference_elements(case: ScanCase) -> int:
    return case.directions * case.batch * case.dim * case.d_state * case.seq_len


def triton_skip(device: torch.device) -> Optional[str]:
    """Why the Triton kernel cannot run on ``device`` (no CUDA and no ``TRITON_INTERPRET=1``), or None."""
    try:
        resolve_backend('triton', torch.empty(0, device=device))
    except ValueError as err:
        return str(err)
    return None


def reference_skip(case: ScanCase, device: torch.device) -> Optional[str]:
    """Why the PyTorch reference does not run ``case`` (over its memory budget), or None."""
    elements = reference_elements(case)
    budget = REFERENCE_MAX_ELEMENTS.get(device.type, REFERENCE_MAX_ELEMENTS['cpu'])
    if elements > budget:
        return (f'the PyTorch reference holds several float32 tensors of {elements / 2 ** 20:,.0f}Mi elements '
                f'(directions x batch x dim x N x L), over the {budget / 2 ** 20:,.0f}Mi budget on {device.type}')
    return None


def make_visionmix(case: ScanCase, device: torch.device, backend: str) -> OpImpl:
    """The op: ``selective_scan_multidir`` over the four orders in one call, or ``selective_scan``."""
    if backend == 'triton':
        name, skip = 'visionmix', triton_skip(device)
        note = 'Triton kernel' + (f', one launch for the {case.directions} directions' if case.grid else '')
    else:
        name, note, skip = 'visionmix-ref', 'sequential PyTorch reference', reference_skip(case, device)
    if skip:
        return OpImpl(name, skip=skip)
    if case.grid is None:
        def fn(t):
            return selective_scan(t['u'], t['delta'], t['A'], t['B'], t['C'], D=t['D'], z=t.get('z'),
                                  delta_bias=t['delta_bias'], delta_softplus=True, backend=backend)
        return OpImpl(name, fn, note=note)
    orders = case.scan_orders(device)[0]

    def fn(t):
        return selective_scan_multidir(t['u'], t['delta'], t['A'], t['B'], t['C'], orders, D=t['D'],
                                       delta_bias=t['delta_bias'], delta_softplus=True, B_bias=t['B_bias'],
                                       permute_params=False, validate_orders=False, backend=backend)
    return OpImpl(name, fn, note=note)


def per_direction_scans(case: ScanCase, device: torch.device, scan_fn: Callable) -> Callable:
    """``fn(inputs)`` running ``scan_fn`` (``selective_scan_fn``'s signature) once per direction: ``u`` gathered in
    the direction's order, ``delta``/``B``/``C`` in token order, ``B + B_bias[k]`` cast to B's dtype, the output
    put back in token order; the outputs are summed (in u's dtype, as visionmix sums them)."""
    orders = case.scan_orders(device)[0]
    inverse = torch.argsort(orders, dim=1)

    def fn(t):
        out = None
        for k in range(orders.shape[0]):
            b_k = (t['B'] + t['B_bias'][k]).to(t['B'].dtype)
            y = scan_fn(t['u'].index_select(-1, orders[k]), t['delta'], t['A'], b_k, t['C'], t['D'], None,
                        t['delta_bias'], True)
            y = y.index_select(-1, inverse[k])
            out = y if out is None else out + y
        return out
    return fn


def make_loop(case: ScanCase, device: torch.device) -> OpImpl:
    if case.grid is None:
        return OpImpl('visionmix-loop', skip='one direction: the same call as visionmix')
    skip = triton_skip(device)
    if skip:
        return OpImpl('visionmix-loop', skip=skip)

    def scan(u, delta, A, B, C, D, z, delta_bias, softplus):
        return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=softplus,
                              backend='triton')
    return OpImpl('visionmix-loop', per_direction_scans(case, device, scan),
                  note=f'{case.directions} selective_scan calls over permuted u, summed')


def import_mamba_scan() -> Callable:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    return selective_scan_fn


def mamba_version() -> Optional[str]:
    try:
        from importlib.metadata import version
        return version('mamba-ssm')
    except Exception:
        return None


def mamba_skip(device: torch.device) -> Optional[str]:
    if device.type != 'cuda':
        return "mamba-ssm's selective_scan_fn is a CUDA kernel: it needs a CUDA device"
    return None


def make_mamba(case: ScanCase, device: torch.device) -> OpImpl:
    """mamba-ssm's ``selective_scan_fn``: one call, or one per direction over permuted ``u`` (VCMamba's original
    code). An import that fails is reported, not raised; a failing first call is caught by the agreement check."""
    try:
        scan_fn = import_mamba_scan()
    except ModuleNotFoundError as err:
        if (err.name or '').split('.')[0] == 'mamba_ssm':
            return OpImpl('mamba-ssm', skip=f'mamba-ssm is not installed ({err})')
        return OpImpl('mamba-ssm', skip=f'mamba-ssm is unavailable: {describe_error(err)}')
    except Exception as err:  # a broken build: undefined symbols, CUDA / torch version mismatch
        return OpImpl('mamba-ssm', skip=f'mamba-ssm is unavailable: {describe_error(err)}')
    skip = mamba_skip(device)
    if skip:
        return OpImpl('mamba-ssm', skip=skip)
    version = mamba_version()
    note = f'mamba-ssm {version}' if version else 'mamba-ssm'
    if case.grid is None:
        def fn(t):
            return scan_fn(t['u'], t['delta'], t['A'], t['B'], t['C'], t['D'], t.get('z'), t['delta_bias'], True)
        return OpImpl('mamba-ssm', fn, note=note)
    return OpImpl('mamba-ssm', per_direction_scans(case, device, scan_fn),
                  note=f'{note}, {case.directions} calls over permuted u (the original model)')


def build_scan_impls(case: ScanCase, device: torch.device, names: Sequence[str]) -> List[OpImpl]:
    """Every requested implementation for ``case``; those that cannot run carry a ``skip`` reason."""
    return build_impls({
        'visionmix': lambda: make_visionmix(case, device, 'triton'),
        'visionmix-ref': lambda: make_visionmix(case, device, 'torch'),
        'visionmix-loop': lambda: make_loop(case, device),
        'mamba-ssm': lambda: make_mamba(case, device),
    }, names)


# ----------------------------------------------------------------------------------------------------------------
# Agreement, then timing


def check_scan_agreement(impls: List[OpImpl], inputs: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, float]:
    """Run each implementation once without autograd and compare its output with visionmix's (or with the first
    that runs when visionmix cannot) by relative RMS error; one that fails or disagrees gets a ``skip``."""
    errors: Dict[str, float] = {}
    expected, expected_name = None, None
    tol = AGREEMENT_TOL[dtype]
    for impl in visionmix_first(impls):
        if impl.skip:
            continue
        try:
            with torch.no_grad():
                out = impl.fn(inputs)
        except Exception as err:  # e.g. a library whose CUDA kernel does not run on this GPU
            impl.skip = f'failed on its first call: {describe_error(err)}'
            continue
        if expected is None:
            expected, expected_name = out, impl.name
            continue
        err = rel_rms_error(out, expected)
        errors[impl.name] = err
        if not math.isfinite(err) or err > tol:
            impl.skip = f'output disagrees with {expected_name}: rel-RMS err {err:.2e} > {tol:.0e}; not timed'
    return errors


def scan_gradients(impl: OpImpl, inputs: Dict[str, torch.Tensor], grad_out: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``{'du': ..., 'ddelta': ..., 'dA': ...}``: the gradient of every input for the cotangent ``grad_out``."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    out = impl.fn(leaves)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    return {'d' + k: g for k, g in zip(leaves, grads)}


def check_scan_gradients(impls: List[OpImpl], inputs: Dict[str, torch.Tensor],
                         dtype: torch.dtype) -> Tuple[Dict[str, float], Dict[str, Dict[str, float]]]:
    """Compare every implementation's gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias, and dz / dB_bias where
    present) with visionmix's by relative RMS error: ``(worst error, error per gradient)`` by implementation.
    One that fails or disagrees on any gradient gets a ``no_backward`` reason."""
    generator = torch.Generator(device='cpu').manual_seed(1)
    u = inputs['u']
    grad_out = torch.randn(u.shape, generator=generator).to(device=u.device, dtype=u.dtype)
    worst: Dict[str, float] = {}
    per_grad: Dict[str, Dict[str, float]] = {}
    expected, expected_name = None, None
    tol = AGREEMENT_TOL[dtype]
    for impl in visionmix_first(impls):
        if impl.skip or impl.no_backward:
            continue
        try:
            grads = scan_gradients(impl, inputs, grad_out)
        except Exception as err:
            impl.no_backward = f'backward failed: {describe_error(err)}'
            continue
        if expected is None:
            expected, expected_name = grads, impl.name
            continue
        errs = {name: rel_rms_error(grads[name], expected[name]) for name in expected}
        name = max(errs, key=lambda k: errs[k] if math.isfinite(errs[k]) else math.inf)
        per_grad[impl.name], worst[impl.name] = errs, errs[name]
        if not math.isfinite(errs[name]) or errs[name] > tol:
            impl.no_backward = (f'gradient {name} disagrees with {expected_name}: rel-RMS err {errs[name]:.2e} > '
                                f'{tol:.0e}; not timed')
    return worst, per_grad


def make_scan_step(impl: OpImpl, inputs: Dict[str, torch.Tensor], mode: str) -> Callable[[], None]:
    """The timed call: forward without autograd, or forward plus backward to every input."""
    if mode == 'fwd':
        def step():
            with torch.no_grad():
                impl.fn(inputs)
        return step
    leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
    with torch.no_grad():
        grad_out = torch.randn_like(impl.fn(inputs))

    def step():
        out = impl.fn(leaves)
        torch.autograd.grad(out, list(leaves.values()), grad_out)
    return step


def benchmark_scan_case(case: ScanCase, args, device: torch.device, dtype: torch.dtype,
                        impls: Optional[List[OpImpl]] = None) -> List[dict]:
    """Check every implementation against visionmix, then time those that agree: one row per impl and mode."""
    impls = build_scan_impls(case, device, args.impls) if impls is None else impls
    inputs = make_scan_inputs(case, device, dtype)
    errors = {'fwd': check_scan_agreement(impls, inputs, dtype)}
    grad_errors: Dict[str, Dict[str, float]] = {}
    if 'fwdbwd' in args.modes:
        errors['fwdbwd'], grad_errors = check_scan_gradients(impls, inputs, dtype)
    rows = []
    for mode in args.modes:
        for impl in impls:
            row = dict(case.row_fields(), mode=mode, impl=impl.name, latency_ms=None, throughput=None,
                       peak_mib=None, rel_err=errors[mode].get(impl.name), ratio=None, status='ok', note=impl.note)
            if mode == 'fwdbwd':
                row['grad_rel_err'] = grad_errors.get(impl.name)
            reason = impl.skip or (impl.no_backward if mode == 'fwdbwd' else None)
            if reason is None:
                try:
                    step = make_scan_step(impl, inputs, mode)
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
    del inputs, impls
    free_memory(device)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Command line


def custom_scan_case(args, parser: argparse.ArgumentParser) -> ScanCase:
    """The one case of ``--shape``: ``DIMxL`` or ``BxDIMxL`` (one scan with z and D, as a language model) or
    ``BxDIMxHxW`` (VCMamba's four snake scans of an H x W token map), state size ``--d-state``."""
    dims = parse_dims(args.shape, '--shape', parser)
    if len(dims) in (3, 4) and args.batch is not None:
        parser.error(f'--shape {args.shape} already sets the batch; drop --batch')
    d_state = DEFAULT_D_STATE if args.d_state is None else args.d_state
    if len(dims) == 2:
        dims = (args.batch or default_batch(args), *dims)
    if len(dims) == 3:
        batch, dim, length = dims
        return ScanCase(f'scan-d{dim}-n{d_state}-l{length}', batch, dim, d_state, length, gate=True, model='custom')
    if len(dims) == 4:
        batch, dim, height, width = dims
        return ScanCase(f'snake{DIRECTIONS}-d{dim}-n{d_state}-{height}x{width}', batch, dim, d_state,
                        grid=(height, width), model='custom')
    parser.error(f'--shape for selective_scan takes DIMxL or BxDIMxL (one gated scan) or BxDIMxHxW (four snake '
                 f'scans of an HxW token map), got {args.shape!r}')


def validate_scan_case(case: ScanCase, parser: argparse.ArgumentParser) -> None:
    """Let visionmix check the shapes (on meta tensors) before any timing."""
    meta = dict(device='meta')
    u = torch.empty(case.batch, case.dim, case.seq_len, **meta)
    bc = torch.empty(case.batch, case.d_state, case.seq_len, **meta)
    vec = torch.empty(case.dim, **meta)
    try:
        check_args(u, u, torch.empty(case.dim, case.d_state, **meta), bc, bc, vec, u if case.gate else None, vec)
    except ValueError as err:
        parser.error(f'case {case.name}: {err}')


def select_cases(cases: List[ScanCase], patterns: str, parser: argparse.ArgumentParser) -> List[ScanCase]:
    wanted = [p.strip() for p in patterns.split(',') if p.strip()]
    chosen = [case for case in cases if any(fnmatch.fnmatchcase(case.name, p) for p in wanted)]
    if not chosen:
        parser.error(f'--cases {patterns!r} matches no default case on this device; they are '
                     f'{", ".join(case.name for case in cases)}')
    return chosen


def library_versions() -> dict:
    versions = {}
    try:
        import triton
        versions['triton'] = triton.__version__
    except ImportError:
        pass
    version = mamba_version()
    if version:
        versions['mamba_ssm'] = version
    return versions


def run(args, parser: argparse.ArgumentParser) -> Tuple[dict, str]:
    """Benchmark the selective scan over the default cases of the device (those matching ``--cases``), or the one
    custom case; returns the result and file stem."""
    if args.shape is not None:
        cases = [custom_scan_case(args, parser)]
    else:
        cases = default_scan_cases(args.device, args.batch or default_batch(args))
        if args.cases:
            cases = select_cases(cases, args.cases, parser)
        if args.device.type != 'cuda':
            args.notes.append('CPU default cases: tiny versions of the GPU cases (see benchmarks/README.md)')
    for case in cases:
        validate_scan_case(case, parser)
    if args.device.type != 'cuda':
        if interpreter_mode():
            args.notes.append('visionmix and visionmix-loop run the Triton kernel in Triton\'s CPU interpreter '
                              '(TRITON_INTERPRET=1), not the PyTorch reference: their times mean nothing')
        else:
            args.notes.append('visionmix and visionmix-loop run the Triton kernel: on CPU set TRITON_INTERPRET=1 '
                              'before the run to use Triton\'s interpreter')
    args.notes.append('rel err: relative RMS error against visionmix, of the output (fwd) or of the worst gradient '
                      '(fwdbwd) among du, ddelta, dA, dB, dC, dD, ddelta_bias (and dz, dB_bias where present); '
                      'ratio: latency / visionmix latency (mamba-ssm / visionmix, reference / visionmix)')
    dtype = DTYPES[args.dtype]
    rows = []
    for case in tqdm(cases, desc=f'selective_scan {args.mode} {args.dtype}', unit='case', file=sys.stderr):
        rows += benchmark_scan_case(case, args, args.device, dtype)
    add_ratios(rows, 'case')
    result = result_header(args, 'op', f'selective scan {args.mode} {args.dtype}')
    result['versions'].update(library_versions())
    result.update(op='selective_scan', rows=rows)
    stem = f'selective_scan_{args.mode}_{args.dtype}'
    if args.shape is not None:
        stem += f'_{cases[0].name}'
    elif args.cases:
        stem += '_' + ''.join(c if c.isalnum() or c in '-_' else '_' for c in args.cases)
    return result, stem
