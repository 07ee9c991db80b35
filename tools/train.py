#!/usr/bin/env python3
"""ImageNet-style training for timm and visionmix models.

A thin loop over timm's library: ``create_model``, ``create_dataset`` / ``create_loader``, ``Mixup``,
``create_optimizer_v2`` and ``create_scheduler_v2``. Every epoch evaluates top-1 / top-5 on the validation
split, appends a row to ``OUTPUT/summary.csv`` and saves ``last.pth.tar`` (and ``model_best.pth.tar``);
``curves.png`` plots the run at the end.

Usage:
    python tools/train.py -c configs/demo/digits_nat.yaml
    python tools/train.py --data-dir /data/imagenet --model nat_mini --epochs 300 -b 128 --lr 1e-3 --amp
    python tools/train.py -c my.yaml --resume output/train/run/last.pth.tar --epochs 400

Config YAML keys are argument names (``batch_size: 64``); flags given on the command line override them.
"""
import argparse
import csv
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from datetime import datetime

import torch
import torch.nn as nn
import yaml
from timm.data import Mixup, create_dataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import AverageMeter, accuracy, random_seed
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import visionmix  # noqa: E402,F401  (registers the visionmix models with timm)

# lr is the mean learning rate of the epoch's updates
SUMMARY_FIELDS = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr')
# args that define the lr schedule; a resumed run restores the scheduler state only when they are unchanged
SCHEDULE_ARGS = ('sched', 'epochs', 'lr', 'min_lr', 'warmup_lr', 'warmup_epochs', 'sched_on_updates', 'batch_size')


class ParseKwargs(argparse.Action):
    """``k=v`` pairs to a dict, values parsed as YAML (``drop_rate=0.1 dims=[32,64]``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, value = item.partition('=')
            if not sep:
                parser.error(f'{option_string} expects key=value, got {item!r}')
            kwargs[key] = yaml.safe_load(value)
        setattr(namespace, self.dest, kwargs)


def _float_pair(value):
    return tuple(float(v) for v in value)


def build_parsers():
    """The ``-c/--config`` pre-parser and the main parser, new on each call (configs set defaults)."""
    config_parser = argparse.ArgumentParser(description='Training config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', metavar='FILE',
                               help='YAML config, its keys are argument names (batch_size: 64)')

    parser = argparse.ArgumentParser(description='visionmix ImageNet-style training', parents=[config_parser])
    group = parser.add_argument_group('Dataset')
    group.add_argument('--data-dir', metavar='DIR', help='dataset root (ImageFolder: DIR/<split>/<class>/*.png)')
    group.add_argument('--dataset', default='', help='timm dataset name, empty for a folder dataset')
    group.add_argument('--train-split', default='train')
    group.add_argument('--val-split', default='validation')

    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='test_convnext', help='timm model name')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='K=V',
                       help='extra create_model kwargs, values parsed as YAML')
    group.add_argument('--pretrained', action='store_true', help='start from pretrained weights')
    group.add_argument('--num-classes', type=int, default=None, help='default: number of class folders')
    group.add_argument('--img-size', type=int, default=None, help='default: the model pretrained_cfg input size')
    group.add_argument('--crop-pct', type=float, default=None, help='eval center-crop fraction')
    group.add_argument('--drop-path', type=float, default=None, help='stochastic depth rate')
    group.add_argument('--grad-checkpointing', action='store_true')
    group.add_argument('--channels-last', action='store_true')

    group = parser.add_argument_group('Optimization')
    group.add_argument('--epochs', type=int, default=100)
    group.add_argument('-b', '--batch-size', type=int, default=128)
    group.add_argument('--opt', default='adamw', help='timm optimizer name')
    group.add_argument('--lr', type=float, default=1e-3)
    group.add_argument('--weight-decay', type=float, default=0.05)
    group.add_argument('--clip-grad', type=float, default=None, help='max grad norm')
    group.add_argument('--sched', default='cosine', help="timm scheduler name, 'none' keeps --lr")
    group.add_argument('--sched-on-updates', action='store_true', help='step the schedule every update, not epoch')
    group.add_argument('--min-lr', type=float, default=0.)
    group.add_argument('--warmup-lr', type=float, default=1e-5)
    group.add_argument('--warmup-epochs', type=int, default=0)

    group = parser.add_argument_group('Augmentation and regularization')
    group.add_argument('--no-aug', action='store_true', help='plain resize / center-crop for training')
    group.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), help='random-resized-crop area range')
    group.add_argument('--hflip', type=float, default=0.5)
    group.add_argument('--color-jitter', type=float, default=0.4)
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    group.add_argument('--mixup', type=float, default=0., help='mixup alpha, 0 = off')
    group.add_argument('--cutmix', type=float, default=0., help='cutmix alpha, 0 = off')

    group = parser.add_argument_group('Runtime')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    group.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    group.add_argument('-j', '--workers', type=int, default=4)
    group.add_argument('--seed', type=int, default=42)
    group.add_argument('--output', metavar='DIR', default='', help='default: output/train/<model>-<time>')
    group.add_argument('--resume', metavar='PATH', default='', help='checkpoint to continue from')
    group.add_argument('--no-progress', action='store_true', help='no tqdm bars, epoch lines only')
    return config_parser, parser


def parse_args(argv=None):
    """Parse ``argv``; keys of the ``--config`` YAML become defaults that explicit flags override."""
    config_parser, parser = build_parsers()
    config_args, _ = config_parser.parse_known_args(argv)
    if config_args.config:
        with open(config_args.config) as f:
            config = yaml.safe_load(f) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            parser.error(f'unknown keys in {config_args.config}: {", ".join(unknown)}')
        parser.set_defaults(**config)
    args = parser.parse_args(argv)
    args.scale = _float_pair(args.scale)
    if args.data_dir is None:
        parser.error('--data-dir is required')
    return args


def num_folder_classes(dataset):
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    if not class_to_idx:
        raise ValueError('cannot infer the number of classes from the dataset, pass --num-classes')
    return len(class_to_idx)


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, epoch, num_updates, args, mixup_fn=None):
    """One pass over ``loader``. Returns mean loss, train top-1 (None under mixup), mean lr and update count."""
    model.train()
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()
    loss_m, top1_m, lr_m = AverageMeter(), AverageMeter(), AverageMeter()
    bar = tqdm(loader, desc=f'train {epoch + 1}/{args.epochs}', leave=False, disable=args.no_progress,
               dynamic_ncols=True)
    for input, target in bar:
        input, target = input.to(device), target.to(device)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        hard_target = target
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)

        with autocast:
            output = model(input)
            loss = loss_fn(output, target)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f'loss is {loss.item()} at epoch {epoch}, stopping')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        lr = optimizer.param_groups[0]['lr']
        optimizer.step()
        lr_m.update(lr)
        num_updates += 1
        if scheduler is not None:
            scheduler.step_update(num_updates=num_updates)  # no-op unless the schedule steps per update

        loss_m.update(loss.item(), input.size(0))
        postfix = dict(loss=f'{loss_m.avg:.4f}')
        if mixup_fn is None:
            top1_m.update(accuracy(output.detach(), hard_target)[0].item(), input.size(0))
            postfix['acc'] = f'{top1_m.avg:.2f}'
        postfix['lr'] = f'{lr:.2e}'
        bar.set_postfix(postfix)

    return dict(
        loss=loss_m.avg,
        top1=top1_m.avg if mixup_fn is None else None,
        lr=lr_m.avg,
        num_updates=num_updates,
    )


@torch.no_grad()
def evaluate(model, loader, device, amp=False, channels_last=False, desc='eval', progress=True):
    """Mean cross-entropy and top-1 / top-5 accuracy (percent) of ``model`` over ``loader``."""
    model.eval()
    device = torch.device(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    loss_fn = nn.CrossEntropyLoss()
    loss_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for input, target in bar:
        input, target = input.to(device), target.to(device)
        if channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with autocast:
            output = model(input)
        output = output.float()
        top1, top5 = accuracy(output, target, topk=(1, 5))
        n = input.size(0)
        loss_m.update(loss_fn(output, target).item(), n)
        top1_m.update(top1.item(), n)
        top5_m.update(top5.item(), n)
        bar.set_postfix(loss=f'{loss_m.avg:.4f}', top1=f'{top1_m.avg:.2f}')
    return dict(loss=loss_m.avg, top1=top1_m.avg, top5=top5_m.avg)


def save_checkpoint(state, output_dir, is_best):
    """Write ``last.pth.tar`` (and ``model_best.pth.tar`` when ``is_best``), each replaced atomically."""
    last_path = os.path.join(output_dir, 'last.pth.tar')
    tmp_path = last_path + '.tmp'
    torch.save(state, tmp_path)
    os.replace(tmp_path, last_path)
    if is_best:
        best_path = os.path.join(output_dir, 'model_best.pth.tar')
        shutil.copyfile(last_path, best_path + '.tmp')
        os.replace(best_path + '.tmp', best_path)


def read_summary(path):
    if not os.path.exists(path):
        return []
    with open(path, newline='') as f:
        return [{k: float(v) if k != 'epoch' else int(v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_summary(path, rows):
    tmp_path = path + '.tmp'
    with open(tmp_path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp_path, path)


def plot_curves(rows, path):
    """Loss and accuracy per epoch, side by side."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    epochs = [row['epoch'] + 1 for row in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row['train_loss'] for row in rows], 'o-', label='train')
    ax_loss.plot(epochs, [row['eval_loss'] for row in rows], 'o-', label='validation')
    ax_loss.set(xlabel='epoch', ylabel='loss', title='Loss')
    ax_acc.plot(epochs, [row['eval_top1'] for row in rows], 'o-', label='top-1')
    ax_acc.plot(epochs, [row['eval_top5'] for row in rows], 'o-', label='top-5')
    ax_acc.set(xlabel='epoch', ylabel='accuracy (%)', title='Validation accuracy')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    """Train, evaluating and checkpointing every epoch. Returns a dict of the run's results."""
    args = parse_args(argv)
    device = torch.device(args.device)
    random_seed(args.seed)
    output_dir = args.output or os.path.join(
        'output', 'train', f'{args.model}-{datetime.now().strftime("%Y%m%d-%H%M%S")}')
    os.makedirs(output_dir, exist_ok=True)

    dataset_train = create_dataset(
        args.dataset, root=args.data_dir, split=args.train_split, is_training=True, batch_size=args.batch_size)
    dataset_eval = create_dataset(
        args.dataset, root=args.data_dir, split=args.val_split, is_training=False, batch_size=args.batch_size)
    num_classes = args.num_classes or num_folder_classes(dataset_train)

    model_kwargs = dict(args.model_kwargs)
    if args.drop_path is not None:
        model_kwargs['drop_path_rate'] = args.drop_path
    model = create_model(args.model, pretrained=args.pretrained, num_classes=num_classes, **model_kwargs)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    num_params = sum(p.numel() for p in model.parameters())

    data_config = resolve_data_config(vars(args), model=model)
    loader_kwargs = dict(
        input_size=data_config['input_size'],
        batch_size=args.batch_size,
        interpolation=data_config['interpolation'],
        mean=data_config['mean'],
        std=data_config['std'],
        num_workers=args.workers,
        use_prefetcher=False,
        pin_memory=device.type == 'cuda',
        device=device,
    )
    loader_train = create_loader(
        dataset_train, is_training=True, no_aug=args.no_aug, scale=args.scale, hflip=args.hflip,
        color_jitter=args.color_jitter, **loader_kwargs)
    loader_eval = create_loader(dataset_eval, crop_pct=data_config['crop_pct'], **loader_kwargs)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
            num_classes=num_classes)
        train_loss_fn = SoftTargetCrossEntropy()  # mixup already folds label smoothing into the targets
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()

    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    updates_per_epoch = len(loader_train)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=args.sched,
        num_epochs=args.epochs,
        min_lr=args.min_lr,
        warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs,
        step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=updates_per_epoch,
    )

    start_epoch = 0
    best_top1, best_epoch = None, None
    summary_path = os.path.join(output_dir, 'summary.csv')
    if args.resume:
        checkpoint = torch.load(args.resume, map_location='cpu', weights_only=True)
        model.load_state_dict(checkpoint['state_dict'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        old_args = checkpoint.get('args', {})
        changed = [k for k in SCHEDULE_ARGS if old_args.get(k) != getattr(args, k)]
        if scheduler is not None and checkpoint.get('scheduler') is not None and not changed:
            scheduler.load_state_dict(checkpoint['scheduler'])
        elif changed:
            print(f'schedule arguments changed ({", ".join(changed)}): the lr follows the new schedule')
        start_epoch = checkpoint['epoch'] + 1
        best_top1, best_epoch = checkpoint.get('best_metric'), checkpoint.get('best_epoch')
        print(f'resumed from {args.resume}, continuing at epoch {start_epoch + 1}')
    rows = [row for row in read_summary(summary_path) if row['epoch'] < start_epoch] if args.resume else []

    # move the schedule to where this run starts (a fresh run is already at 0)
    if scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            scheduler.step(start_epoch)

    print(f'{args.model}: {num_params / 1e6:.2f}M params, {num_classes} classes, input {data_config["input_size"]}, '
          f'{len(dataset_train)} train / {len(dataset_eval)} val images, {updates_per_epoch} updates/epoch, '
          f'device {device}, output {output_dir}')

    num_updates = start_epoch * updates_per_epoch
    eval_metrics = None
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.perf_counter()
        train_metrics = train_one_epoch(
            model, loader_train, train_loss_fn, optimizer, scheduler, epoch, num_updates, args, mixup_fn=mixup_fn)
        num_updates = train_metrics['num_updates']
        eval_metrics = evaluate(
            model, loader_eval, device, amp=args.amp, channels_last=args.channels_last,
            desc=f'eval  {epoch + 1}/{args.epochs}', progress=not args.no_progress)
        if scheduler is not None:
            scheduler.step(epoch + 1, eval_metrics['top1'])  # no-op when the schedule steps per update

        rows.append(dict(
            epoch=epoch,
            train_loss=train_metrics['loss'],
            eval_loss=eval_metrics['loss'],
            eval_top1=eval_metrics['top1'],
            eval_top5=eval_metrics['top5'],
            lr=train_metrics['lr'],
        ))
        write_summary(summary_path, rows)

        is_best = best_top1 is None or eval_metrics['top1'] > best_top1
        if is_best:
            best_top1, best_epoch = eval_metrics['top1'], epoch
        save_checkpoint(dict(
            epoch=epoch,
            arch=args.model,
            state_dict=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            args=vars(args),
            metric=eval_metrics['top1'],
            best_metric=best_top1,
            best_epoch=best_epoch,
        ), output_dir, is_best)

        train_top1 = '' if train_metrics['top1'] is None else f'train_acc {train_metrics["top1"]:6.2f}  '
        print(f'epoch {epoch + 1:3d}/{args.epochs}  train_loss {train_metrics["loss"]:.4f}  {train_top1}'
              f'eval_loss {eval_metrics["loss"]:.4f}  top1 {eval_metrics["top1"]:6.2f}  '
              f'top5 {eval_metrics["top5"]:6.2f}  lr {train_metrics["lr"]:.2e}  '
              f'{time.perf_counter() - epoch_start:5.1f}s', flush=True)

    if rows:
        plot_curves(rows, os.path.join(output_dir, 'curves.png'))
    final = rows[-1] if rows else {}
    return dict(
        best_top1=best_top1,
        best_epoch=best_epoch,
        final_top1=final.get('eval_top1'),
        final_top5=final.get('eval_top5'),
        final_eval_loss=final.get('eval_loss'),
        epochs_run=max(0, args.epochs - start_epoch),
        start_epoch=start_epoch,
        num_classes=num_classes,
        num_params=num_params,
        output=output_dir,
    )


if __name__ == '__main__':
    main()
