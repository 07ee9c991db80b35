#!/usr/bin/env python3
"""Top-1 / top-5 accuracy and loss of a model on an ImageFolder split.

The model is ``--model NAME`` with its released weights (``--pretrained``) or ``--checkpoint PATH``: a
``tools/train.py`` checkpoint (its weights, or the EMA weights with ``--use-ema``) or a plain / released state
dict, read by timm's ``load_checkpoint``. Preprocessing is the model's own (``resolve_data_config`` on its
pretrained cfg); a train.py checkpoint brings its training run's input size, crop and interpolation, and
``--img-size`` / ``--crop-pct`` / ``--interpolation`` override either. Results are printed as JSON and
written to ``--results-file``.

Usage:
    python tools/validate.py --data-dir /data/imagenet --model nat_tiny --pretrained --amp
    python tools/validate.py --data-dir /data/imagenet --checkpoint output/train/run/model_best.pth.tar --use-ema
"""
import argparse
import importlib.util
import json
import os
import sys
import time

import torch
import yaml
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.models import create_model, load_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
import visionmix  # noqa: E402,F401  (registers the visionmix models with timm)


def _load_train_module():
    spec = importlib.util.spec_from_file_location('visionmix_tools_train', os.path.join(REPO_ROOT, 'tools', 'train.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='visionmix validation')
    parser.add_argument('--data-dir', metavar='DIR', required=True, help='dataset root (DIR/<split>/<class>/*)')
    parser.add_argument('--dataset', default='', help='timm dataset name, empty for a folder dataset')
    parser.add_argument('--split', default='validation')
    parser.add_argument('--model', default=None, help='timm model name (default: the train.py checkpoint arch)')
    parser.add_argument('--model-kwargs', type=yaml.safe_load, default=None, metavar='YAML',
                        help="extra create_model kwargs as a YAML mapping, e.g. '{drop_rate: 0.1}'")
    parser.add_argument('--pretrained', action='store_true', help='the model released weights')
    parser.add_argument('--checkpoint', default='', metavar='PATH', help='train.py checkpoint or a state dict')
    parser.add_argument('--use-ema', action='store_true', help='the EMA weights of a train.py checkpoint')
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--img-size', type=int, default=None)
    parser.add_argument('--crop-pct', type=float, default=None)
    parser.add_argument('--interpolation', default='')
    parser.add_argument('-b', '--batch-size', type=int, default=256)
    parser.add_argument('-j', '--workers', type=int, default=4)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true', help='autocast to --amp-dtype')
    parser.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'))
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--results-file', default='', metavar='PATH', help='write the results here as JSON')
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)
    if args.pretrained and args.checkpoint:
        parser.error('give --pretrained or --checkpoint, not both')
    return args


def main(argv=None):
    """Evaluate and return the results dict (also printed, and written to --results-file)."""
    args = parse_args(argv)
    train = _load_train_module()
    device = torch.device(args.device)

    train_args = {}
    if args.checkpoint:
        checkpoint = torch.load(args.checkpoint, map_location='cpu', weights_only=True)
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get('args'), dict) and 'arch' in checkpoint:
            train_args = checkpoint['args']
            args.model = args.model or checkpoint['arch']
            if args.use_ema and checkpoint.get('state_dict_ema') is None:
                raise SystemExit(f'{args.checkpoint} has no EMA weights (trained without --model-ema)')
        del checkpoint
    if not args.model:
        raise SystemExit('--model is required unless --checkpoint is a train.py checkpoint')
    for key in ('img_size', 'crop_pct', 'interpolation'):
        if not getattr(args, key) and train_args.get(key):
            setattr(args, key, train_args[key])

    dataset = create_dataset(args.dataset, root=args.data_dir, split=args.split, is_training=False,
                             batch_size=args.batch_size)
    num_classes = args.num_classes
    if num_classes is None and train_args:
        num_classes = train_args.get('num_classes') or train.num_folder_classes(dataset)
    model_kwargs = dict(train_args.get('model_kwargs') or {})
    model_kwargs.update(args.model_kwargs or {})
    if num_classes is not None:
        model_kwargs['num_classes'] = num_classes
    model = create_model(args.model, pretrained=args.pretrained, **model_kwargs)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, use_ema=args.use_ema)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    data_config = resolve_data_config(vars(args), model=model)
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'), num_workers=args.workers,
        use_prefetcher=False, pin_memory=device.type == 'cuda', device=device)

    start = time.perf_counter()
    metrics = train.evaluate(model, loader, device, amp=args.amp, amp_dtype=args.amp_dtype,
                             channels_last=args.channels_last, desc=f'validate {args.model}',
                             progress=not args.no_progress)
    results = dict(
        model=args.model,
        checkpoint=args.checkpoint or None,
        pretrained=args.pretrained,
        use_ema=args.use_ema,
        top1=metrics['top1'],
        top5=metrics['top5'],
        loss=metrics['loss'],
        num_images=len(dataset),
        param_count=sum(p.numel() for p in model.parameters()) / 1e6,
        input_size=list(data_config['input_size']),
        crop_pct=data_config['crop_pct'],
        interpolation=data_config['interpolation'],
        amp=args.amp and args.amp_dtype,
        seconds=time.perf_counter() - start,
    )
    text = json.dumps(results, indent=2)
    print(text)
    if args.results_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.results_file)), exist_ok=True)
        with open(args.results_file, 'w') as f:
            f.write(text + '\n')
    return results


if __name__ == '__main__':
    main()
