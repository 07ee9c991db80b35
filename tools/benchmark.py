#!/usr/bin/env python3
"""Benchmark visionmix operators and models, side by side with baselines in one run.

Neighborhood attention (against SDPA, flex attention and NATTEN)::

    python tools/benchmark.py --op na2d --mode both --dtype bf16
    python tools/benchmark.py --op na2d --shape 1x56x56x2x32 --kernel-size 7 --dilation 4

Global linear attention (against an O(N^2) PyTorch version, flash-linear-attention and
flash-bidirectional-linear-attention)::

    python tools/benchmark.py --op linear --mode both
    python tools/benchmark.py --op linear --shape 8x56x56x1x64 --form mala

Block-sparse attention (GRAT, BiFormer and MoBA-like indices, against SDPA dense and masked and flex attention)::

    python tools/benchmark.py --op block_sparse --mode both
    python tools/benchmark.py --op bsa --cases 'grat-*' --dtype bf16
    python tools/benchmark.py --op bsa --shape 1x32768x16x128 --block-size 128 --density 0.1 --causal

Selective scan (VCMamba's four-direction layers and Mamba language-model layers, against the PyTorch reference,
one call per direction and mamba-ssm; on CPU run it with TRITON_INTERPRET=1 to use Triton's interpreter)::

    python tools/benchmark.py --op selective_scan --mode both
    python tools/benchmark.py --op selective_scan --cases 'vcmamba-*-224' --dtype bf16
    python tools/benchmark.py --op selective_scan --shape 8x1024x32x32 --d-state 16

Models registered with timm (``import visionmix`` registers the visionmix ones)::

    python tools/benchmark.py --model nat_mini --mode both --batch 64
    python tools/benchmark.py --model 'dinat_*' --img-size 384
    python tools/benchmark.py --list-models

Results are printed as a markdown table and written as ``.json``, ``.md`` and ``.png`` under
``benchmarks/results/<device>/`` (``--out-dir`` overrides). See ``benchmarks/README.md``.
The work is done by ``tools/bench/``: ``common`` (timing, agreement checks, result files),
``neighborhood``, ``linear_attention``, ``block_sparse``, ``selective_scan`` and ``models``.
"""
import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from tools.bench import block_sparse, linear_attention, models, neighborhood, selective_scan  # noqa: E402
from tools.bench.common import (  # noqa: E402
    DEFAULT_RESULTS_DIR,
    DTYPES,
    MODES,
    clear_reported_skips,
    device_slug,
    markdown_report,
    write_results,
)
from visionmix.kernels.linear_attention import FEATURE_MAPS, FORMS  # noqa: E402

OP_ALIASES = {'la': 'linear', 'bsa': 'block_sparse'}
OP_CHOICES = sorted(neighborhood.OPS) + ['linear', 'block_sparse', 'selective_scan', *OP_ALIASES]
BLOCK_SPARSE_FLAGS = ('block_size', 'density', 'topk', 'cases')
CASES_OPS = ('block_sparse', 'selective_scan')  # ops whose default cases --cases can pick from


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Benchmark visionmix ops or timm-registered models against baselines, side by side.')
    what = parser.add_mutually_exclusive_group()
    what.add_argument('--op', choices=OP_CHOICES,
                      help='operator to benchmark: neighborhood attention, global linear attention '
                           '(linear, alias la), block-sparse attention (block_sparse, alias bsa) or the selective '
                           'scan (selective_scan); default na2d')
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
                        help='batch size (ops, selective_scan included: 8 on CUDA, 1 on CPU, but 1 for the GRAT '
                             'and MoBA cases of block_sparse; models: 64 on CUDA, 2 on CPU)')
    parser.add_argument('--impls', default=None,
                        help=f"comma-separated subset of implementations (neighborhood ops: "
                             f"{','.join(neighborhood.IMPLS)}; linear: {','.join(linear_attention.IMPLS)}; "
                             f"block_sparse: {','.join(block_sparse.IMPLS)}; selective_scan: "
                             f"{','.join(selective_scan.IMPLS)}; models: {','.join(models.IMPLS)})")
    parser.add_argument('--with-flex', action='store_true', help='include flex attention on CPU (slow to compile)')
    parser.add_argument('--out-dir', type=Path, default=None,
                        help='where to write json/md/png (default benchmarks/results/<device>)')
    case = parser.add_argument_group('custom op case (replaces the default cases)')
    case.add_argument('--shape', help='na ops: spatial dims (56x56) or the full heads-last shape (8x56x56x2x32); '
                                      'linear: tokens (3136 or 56x56) or the full shape (8x3136x2x32 or 8x56x56x2x32); '
                                      'block_sparse: tokens (16384) or the full shape (1x16384x4x64); '
                                      'selective_scan: DIMxL or BxDIMxL (one gated scan, 1536x2048) or BxDIMxHxW '
                                      '(four snake scans of an HxW token map, 8x1024x16x16)')
    case.add_argument('--kernel-size', help='na ops: kernel size, one value or one per axis (default 7)')
    case.add_argument('--dilation', help='na ops: dilation, one value or one per axis (default 1)')
    case.add_argument('--heads', type=int, default=None, help='heads (default 4)')
    case.add_argument('--head-dim', type=int, default=None, help='head dim (default 32)')
    case.add_argument('--causal', action='store_true',
                      help='na ops: causal along every axis; block_sparse: block-causal (own block, causal inside, '
                           'plus random earlier blocks)')
    case.add_argument('--form', choices=FORMS,
                      help='linear: form of the custom case (default normalized), or without --shape the '
                           'default cases of that form only')
    case.add_argument('--feature-map', choices=FEATURE_MAPS,
                      help="linear: feature map of the custom case (default: the form's)")
    case.add_argument('--block-size', type=int, default=None,
                      help='block_sparse: tokens per block of the custom case '
                           f'(default {block_sparse.CUSTOM_BLOCK_SIZE})')
    case.add_argument('--topk', type=int, default=None,
                      help='block_sparse: key blocks per query block of the custom case, chosen at random')
    case.add_argument('--density', type=float, default=None,
                      help='block_sparse: fraction of key blocks per query block of the custom case instead of '
                           f'--topk (default {block_sparse.CUSTOM_DENSITY})')
    case.add_argument('--d-state', type=int, default=None,
                      help='selective_scan: state size N of the custom case '
                           f'(default {selective_scan.DEFAULT_D_STATE})')
    parser.add_argument('--cases', default=None,
                        help="block_sparse, selective_scan: run only the default cases matching these comma-separated "
                             "glob patterns, e.g. 'grat-*,moba-*' or 'vcmamba-*'")
    model = parser.add_argument_group('models')
    model.add_argument('--img-size', type=int, default=None, help="input size (default pretrained_cfg['input_size'])")
    return parser


def given_flags(args, *names: str):
    """The ``--flag`` spellings of the options in ``names`` that were set on the command line."""
    return ['--' + name.replace('_', '-') for name in names if getattr(args, name) not in (None, False)]


def resolve_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse and fill in device-dependent defaults; argument errors exit through ``parser.error``."""
    args = parser.parse_args(argv)
    if args.op is None and args.model is None:
        args.op = 'na2d'
    args.op = OP_ALIASES.get(args.op, args.op)
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
    known = benchmark_module(args).IMPLS
    if args.impls is None:
        args.impls = list(known)
    else:
        args.impls = list(dict.fromkeys(name.strip() for name in args.impls.split(',') if name.strip()))
        unknown = [name for name in args.impls if name not in known]
        if unknown or not args.impls:
            parser.error(f'--impls takes a subset of {", ".join(known)}, got {unknown or args.impls}')
    if args.model is not None:
        custom = given_flags(args, 'shape', 'kernel_size', 'dilation', 'heads', 'head_dim', 'causal', 'form',
                             'feature_map', 'd_state', *BLOCK_SPARSE_FLAGS)
        if custom:
            parser.error(f'{", ".join(custom)}: only for op cases, not with --model')
        return args
    only_block_sparse = given_flags(args, *(flag for flag in BLOCK_SPARSE_FLAGS if flag != 'cases'))
    if only_block_sparse and args.op != 'block_sparse':
        parser.error(f'{", ".join(only_block_sparse)}: only for --op block_sparse, not with --op {args.op}')
    if args.cases is not None and args.op not in CASES_OPS:
        parser.error(f'--cases: only for --op {" or ".join(CASES_OPS)}, not with --op {args.op}')
    if args.d_state is not None and args.op != 'selective_scan':
        parser.error(f'--d-state: only for --op selective_scan, not with --op {args.op}')
    if args.op == 'selective_scan':
        other = given_flags(args, 'kernel_size', 'dilation', 'heads', 'head_dim', 'causal', 'form', 'feature_map')
        if other:
            parser.error(f'{", ".join(other)}: not for --op selective_scan')
        if args.cases is not None and args.shape is not None:
            parser.error('--cases picks default cases; it does not go with --shape')
        custom = ['--d-state'] if args.d_state is not None else []
    elif args.op == 'block_sparse':
        other = given_flags(args, 'kernel_size', 'dilation', 'form', 'feature_map')
        if other:
            parser.error(f'{", ".join(other)}: not for --op block_sparse')
        if args.cases is not None and args.shape is not None:
            parser.error('--cases picks default cases; it does not go with --shape')
        custom = given_flags(args, 'heads', 'head_dim', 'causal', 'block_size', 'topk', 'density')
    elif args.op == 'linear':
        other = given_flags(args, 'kernel_size', 'dilation', 'causal')
        if other:
            parser.error(f'{", ".join(other)}: only for neighborhood ops, not with --op linear')
        custom = given_flags(args, 'heads', 'head_dim', 'feature_map')
    else:
        other = given_flags(args, 'form', 'feature_map')
        if other:
            parser.error(f'{", ".join(other)}: only for --op linear, not with --op {args.op}')
        custom = given_flags(args, 'kernel_size', 'dilation', 'heads', 'head_dim', 'causal')
    if args.shape is None and custom:
        parser.error(f'{", ".join(custom)}: only for a custom case, which needs --shape')
    return args


def benchmark_module(args):
    """The module that runs what ``args`` asks for; each has ``IMPLS``, ``TABLE`` and ``run(args, parser)``."""
    if args.model is not None:
        return models
    return {'linear': linear_attention, 'block_sparse': block_sparse,
            'selective_scan': selective_scan}.get(args.op, neighborhood)


def main(argv=None) -> dict:
    """Run the benchmark described by ``argv`` (``sys.argv[1:]`` when None); returns the results written."""
    parser = build_parser()
    args = resolve_args(parser, argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.list_models:
        names = models.visionmix_models()
        print('\n'.join(names) if names else 'no visionmix models are registered')
        return dict(kind='list', models=names)
    clear_reported_skips()
    for note in args.notes:
        print(f'note: {note}', file=sys.stderr)
    module = benchmark_module(args)
    result, stem = module.run(args, parser)
    out_dir = args.out_dir or DEFAULT_RESULTS_DIR / device_slug(args.device)
    result['files'] = write_results(result, Path(out_dir), stem, module.TABLE)
    print(markdown_report(result, module.TABLE))
    print('wrote ' + ', '.join(result['files'].values()))
    return result


if __name__ == '__main__':
    main()
