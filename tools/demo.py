#!/usr/bin/env python3
"""``make demo``: train a tiny NAT on real handwritten digits, check it, and list the visionmix models.

Steps: export scikit-learn's 1,797 digit scans to ``.cache/digits`` (ImageFolder), train with
``tools/train.py`` and ``configs/demo/digits_nat.yaml`` into ``runs/demo``, reload ``model_best.pth.tar``
into a fresh model and evaluate it on the validation split, then print params / GFLOPs of every
registered visionmix model. A few minutes on a 2-core CPU; exits non-zero if the model does not learn.
"""
import importlib.util
import os
import shutil
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from visionmix.data import export_digits  # noqa: E402
from visionmix.profile import format_table, model_table  # noqa: E402

CONFIG = os.path.join(REPO_ROOT, 'configs', 'demo', 'digits_nat.yaml')
DATA_DIR = os.path.join(REPO_ROOT, '.cache', 'digits')
OUTPUT_DIR = os.path.join(REPO_ROOT, 'runs', 'demo')
MIN_TOP1 = 90.0


def load_train_module():
    spec = importlib.util.spec_from_file_location('visionmix_train', os.path.join(REPO_ROOT, 'tools', 'train.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate_checkpoint(train, checkpoint_path):
    """Rebuild the model from a checkpoint alone and evaluate it on the validation split."""
    import timm
    from timm.data import create_dataset, create_loader, resolve_data_config

    checkpoint = torch.load(checkpoint_path, map_location='cpu', weights_only=True)
    args = checkpoint['args']
    model = timm.create_model(checkpoint['arch'], num_classes=args['num_classes'], **args['model_kwargs'])
    model.load_state_dict(checkpoint['state_dict'])
    data_config = resolve_data_config(args, model=model)
    dataset = create_dataset('', root=args['data_dir'], split=args['val_split'])
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args['batch_size'],
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'], num_workers=0, use_prefetcher=False)
    metrics = train.evaluate(model.to(args['device']), loader, args['device'], desc='eval  best checkpoint')
    metrics['epoch'] = checkpoint['epoch']
    return metrics


def main():
    start = time.perf_counter()
    counts = export_digits(DATA_DIR)
    print(f'digits: {counts["train"]} train / {counts["validation"]} validation images in {DATA_DIR}')

    train = load_train_module()
    shutil.rmtree(OUTPUT_DIR, ignore_errors=True)
    result = train.main(['-c', CONFIG, '--data-dir', DATA_DIR, '--output', OUTPUT_DIR])
    train_time = time.perf_counter() - start

    best = evaluate_checkpoint(train, os.path.join(OUTPUT_DIR, 'model_best.pth.tar'))
    print(f'\nfinal top-1 {result["final_top1"]:.2f}%, best top-1 {best["top1"]:.2f}% '
          f'(top-5 {best["top5"]:.2f}%, epoch {best["epoch"] + 1}, reloaded from model_best.pth.tar)')
    print(f'curves, summary and checkpoints in {os.path.relpath(OUTPUT_DIR, REPO_ROOT)}/')

    print('\nvisionmix models (GFLOPs = multiply-accumulates, one image at the model default size):')
    print(format_table(model_table()))
    print(f'\ndemo done in {time.perf_counter() - start:.0f}s (training {train_time:.0f}s)')

    if abs(best['top1'] - result['best_top1']) > 1e-3:
        sys.exit(f'reloaded checkpoint scores {best["top1"]:.2f}%, training recorded {result["best_top1"]:.2f}%')
    if result['final_top1'] < MIN_TOP1:
        sys.exit(f'demo model reached only {result["final_top1"]:.2f}% top-1, expected at least {MIN_TOP1}%')


if __name__ == '__main__':
    main()
