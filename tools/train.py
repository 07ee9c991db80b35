#!/usr/bin/env python3
"""ImageNet-style training for timm and visionmix models.

A thin loop over timm's library: ``create_model``, ``create_dataset`` / ``create_loader``, ``Mixup``,
``create_optimizer_v2`` and ``create_scheduler_v2``. Every epoch evaluates top-1 / top-5 on the validation
split, appends a row to ``OUTPUT/summary.csv`` and saves ``last.pth.tar`` (and ``model_best.pth.tar``);
``curves.png`` plots the run at the end. Model EMA (``--model-ema``), RandAugment / random erasing / mixup /
cutmix / repeated augmentation, bfloat16 or float16 AMP, ``torch.compile`` and distributed data parallel
(launched by ``torchrun``, with ``--sync-bn`` on CUDA) follow timm's own train.py, and so do gradient accumulation
(``--grad-accum-steps``) and ``--cooldown-epochs`` at the minimum lr after the schedule. ``--distill-teacher``
adds DeiT's hard or soft distillation from a frozen timm teacher. ``--checkpoint-interval N`` also saves
``last.pth.tar`` every N updates inside an epoch; resuming from it continues at the next update (each epoch's shuffle
is fixed by ``--seed`` and the epoch, the consumed batches are skipped).

Usage:
    python tools/train.py -c configs/demo/digits_nat.yaml
    python tools/train.py --data-dir /data/imagenet --model nat_mini --epochs 300 -b 128 --lr 1e-3 --amp
    python tools/train.py -c my.yaml --resume output/train/run/last.pth.tar --epochs 400
    python tools/train.py -c configs/imagenet/vcmamba_small.yaml --data-dir /data/imagenet --teacher-checkpoint t.pth
    torchrun --nproc_per_node 8 tools/train.py -c configs/imagenet/nat_tiny.yaml --data-dir /data/imagenet

Config YAML keys are argument names (``batch_size: 64``); flags given on the command line override them.
"""
import argparse
import csv
import itertools
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from datetime import datetime

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml
from timm.data import Mixup, create_dataset, create_loader, resolve_data_config
from timm.data.distributed_sampler import RepeatAugSampler
from timm.layers import convert_sync_batchnorm
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model, get_pretrained_cfg_value
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import DistillationTeacher
from timm.utils import ModelEmaV3, accuracy, distribute_bn, random_seed, unwrap_model
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import visionmix  # noqa: E402,F401  (registers the visionmix models with timm)

# lr is the mean learning rate of the epoch's updates; the ema_ columns are written with --model-ema
SUMMARY_FIELDS = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr')
EMA_SUMMARY_FIELDS = ('ema_eval_loss', 'ema_eval_top1', 'ema_eval_top5')
# args that define the lr schedule; a resumed run restores the scheduler state only when they are unchanged
SCHEDULE_ARGS = ('sched', 'epochs', 'lr', 'min_lr', 'warmup_lr', 'warmup_epochs', 'sched_on_updates', 'batch_size',
                 'grad_accum_steps')
# the value of args added later, for checkpoints written before them
LATER_ARG_DEFAULTS = dict(grad_accum_steps=1)
# devices torch's SyncBatchNorm runs on in training (torch.nn.modules.batchnorm.SyncBatchNorm.forward)
SYNC_BN_DEVICES = ('cuda', 'hpu', 'xpu', torch._C._get_privateuse1_backend_name())


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
    group.add_argument('--interpolation', default='', help='resize interpolation, default: the model pretrained_cfg')
    group.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (timm ModelEmaV3)')
    group.add_argument('--model-ema-decay', type=float, default=0.9998)
    group.add_argument('--model-ema-warmup', action='store_true', help='ramp the EMA decay up over the first updates')

    group = parser.add_argument_group('Optimization')
    group.add_argument('--epochs', type=int, default=100)
    group.add_argument('-b', '--batch-size', type=int, default=128, help='per process (GPU)')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='sum the gradients of N batches into one update (each loss divided by N, an epoch-end '
                            'group of fewer batches by its size); the schedule, EMA and checkpoints count updates')
    group.add_argument('--opt', default='adamw', help='timm optimizer name')
    group.add_argument('--lr', type=float, default=1e-3)
    group.add_argument('--weight-decay', type=float, default=0.05)
    group.add_argument('--clip-grad', type=float, default=None, help='max grad norm')
    group.add_argument('--momentum', type=float, default=0.9, help='SGD momentum (sgd / momentum optimizers)')
    group.add_argument('--opt-eps', type=float, default=None, help='optimizer epsilon, default: the optimizer own')
    group.add_argument('--opt-betas', type=float, nargs='+', default=None, help='optimizer betas')
    group.add_argument('--sched', default='cosine', help="timm scheduler name, 'none' keeps --lr")
    group.add_argument('--sched-on-updates', action='store_true', help='step the schedule every update, not epoch')
    group.add_argument('--min-lr', type=float, default=0.)
    group.add_argument('--decay-rate', type=float, default=0.1,
                       help="timm's decay_rate: the lr factor of step schedules, the power of 'poly' (1.0 = linear)")
    group.add_argument('--warmup-lr', type=float, default=1e-5)
    group.add_argument('--warmup-epochs', type=int, default=0)
    group.add_argument('--cooldown-epochs', type=int, default=0,
                       help='epochs at --min-lr trained after --epochs (cosine / tanh / poly schedules, as timm)')

    group = parser.add_argument_group('Augmentation and regularization')
    group.add_argument('--no-aug', action='store_true', help='plain resize / center-crop for training')
    group.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), help='random-resized-crop area range')
    group.add_argument('--hflip', type=float, default=0.5)
    group.add_argument('--color-jitter', type=float, default=0.4)
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    group.add_argument('--mixup', type=float, default=0., help='mixup alpha, 0 = off')
    group.add_argument('--cutmix', type=float, default=0., help='cutmix alpha, 0 = off')
    group.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or cutmix per batch')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of cutmix when both on')
    group.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'))
    group.add_argument('--aa', default=None, help='auto-augment policy, e.g. rand-m9-mstd0.5-inc1')
    group.add_argument('--reprob', type=float, default=0., help='random erasing probability')
    group.add_argument('--remode', default='pixel', help='random erasing fill mode')
    group.add_argument('--recount', type=int, default=1, help='random erasing regions')
    group.add_argument('--aug-repeats', type=float, default=0,
                       help='repeated augmentation: each image N times per epoch (timm RepeatAugSampler)')

    group = parser.add_argument_group('Distillation (DeiT)')
    group.add_argument('--distill-teacher', default='', metavar='MODEL',
                       help='timm name of a frozen teacher, e.g. regnety_160.deit_in1k (empty: no distillation). The '
                            'loss is (1 - alpha) x label loss + alpha x distillation loss as in DeiT; a student that '
                            'returns (cls, dist) logits is split as in DeiT, one that returns a single tensor (all '
                            'visionmix models) uses it for both terms')
    group.add_argument('--teacher-checkpoint', default='', metavar='PATH',
                       help="teacher weights (its EMA copy if the file has one), default: the model's pretrained ones")
    group.add_argument('--distill-type', default='hard', choices=('hard', 'soft'),
                       help="hard: cross entropy with the teacher's argmax; soft: KL divergence at --distill-tau")
    group.add_argument('--distill-alpha', type=float, default=0.5, help='weight of the distillation term')
    group.add_argument('--distill-tau', type=float, default=1.0, help='soft distillation temperature')

    group = parser.add_argument_group('Runtime')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    group.add_argument('--amp', action='store_true', help='autocast to --amp-dtype')
    group.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'),
                       help='float16 adds a GradScaler')
    group.add_argument('--torch-compile', action='store_true', help='torch.compile the model')
    group.add_argument('--torch-compile-backend', default='inductor', help="torch.compile backend ('eager' on CPU)")
    group.add_argument('--sync-bn', action='store_true',
                       help='distributed runs: BatchNorm statistics synchronized across the ranks (SyncBatchNorm, not '
                            'on CPU); without it they are averaged at each epoch end')
    group.add_argument('-j', '--workers', type=int, default=4)
    group.add_argument('--seed', type=int, default=42)
    group.add_argument('--output', metavar='DIR', default='', help='default: output/train/<model>-<time>')
    group.add_argument('--resume', metavar='PATH', default='', help='checkpoint to continue from')
    group.add_argument('--checkpoint-interval', type=int, default=0, metavar='N',
                       help='also save last.pth.tar every N updates inside an epoch (0: at epoch ends only)')
    group.add_argument('--stop-after-updates', type=int, default=0, metavar='N',
                       help='debugging: exit without saving after update N, as if the job were killed')
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
    if args.opt_betas is not None:
        args.opt_betas = _float_pair(args.opt_betas)
    if args.data_dir is None:
        parser.error('--data-dir is required')
    if args.grad_accum_steps < 1:
        parser.error('--grad-accum-steps must be at least 1')
    return args


def num_folder_classes(dataset):
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    if not class_to_idx:
        raise ValueError('cannot infer the number of classes from the dataset, pass --num-classes')
    return len(class_to_idx)


def init_distributed(args):
    """Join the process group ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK): nccl on CUDA, gloo on CPU.

    Sets ``args.rank``, ``args.world_size``, ``args.distributed`` (and ``args.device`` to the local GPU)."""
    args.world_size = int(os.environ.get('WORLD_SIZE', 1))
    args.rank = int(os.environ.get('RANK', 0))
    args.local_rank = int(os.environ.get('LOCAL_RANK', 0))
    args.distributed = args.world_size > 1
    if not args.distributed:
        return
    if torch.device(args.device).type == 'cuda':
        args.device = f'cuda:{args.local_rank}'
        torch.cuda.set_device(args.local_rank)
        backend = 'nccl'
    else:
        backend = 'gloo'
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)


def all_reduce_sum(values, device):
    """Sum a list of numbers over the ranks (returned unchanged outside distributed runs)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def get_rng_state():
    """torch / numpy / python (and CUDA) generator states, storable with ``torch.save(weights_only=True)``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=(name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    python = state['python']
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


class EpochSampler(torch.utils.data.Sampler):
    """The train loader's sampler with a fixed order per epoch and a resumable start.

    Wraps timm's sampler (``RandomSampler``, ``DistributedSampler`` or ``RepeatAugSampler``): ``set_epoch(epoch,
    skip)`` seeds its shuffle with ``seed + epoch`` and drops the first ``skip`` indices (the batches a
    mid-epoch checkpoint already consumed). The length stays the full epoch's.
    """

    def __init__(self, sampler, seed):
        self.sampler, self.seed, self.skip = sampler, seed, 0

    def set_epoch(self, epoch, skip=0):
        self.skip = skip
        if isinstance(self.sampler, torch.utils.data.RandomSampler):
            self.sampler.generator = torch.Generator().manual_seed(self.seed + epoch)
        elif isinstance(self.sampler, torch.utils.data.DistributedSampler):
            self.sampler.seed = self.seed
            self.sampler.set_epoch(epoch)
        elif hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(self.seed + epoch)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self):
        return len(self.sampler)


def amp_autocast(device, amp, amp_dtype='bfloat16'):
    if not amp:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, amp_dtype))


class DistillationLoss(nn.Module):
    """DeiT's distillation loss (facebookresearch/deit losses.py), given the teacher's logits.

    ``(1 - alpha) * base_loss(cls, target) + alpha * distillation``; hard: cross entropy of ``dist`` with the teacher's
    argmax, soft: ``KL(log_softmax(dist / tau), log_softmax(teacher / tau)) * tau^2 / dist.numel()`` (summed).
    A student output ``(cls, dist)`` is split as in DeiT; a single tensor is both ``cls`` and ``dist``.
    """

    def __init__(self, base_loss, distill_type='hard', alpha=0.5, tau=1.0):
        super().__init__()
        if distill_type not in ('hard', 'soft'):
            raise ValueError(f'distill_type must be hard or soft, got {distill_type!r}')
        self.base_loss, self.distill_type, self.alpha, self.tau = base_loss, distill_type, alpha, tau

    def forward(self, output, target, teacher_output):
        # our models have one head (VCMamba's head and dist_head are folded into it): it serves both terms
        output_kd = output
        if isinstance(output, (tuple, list)):
            output, output_kd = output
        base_loss = self.base_loss(output, target)
        if self.distill_type == 'soft':
            tau = self.tau
            distill_loss = F.kl_div(
                F.log_softmax(output_kd / tau, dim=1), F.log_softmax(teacher_output / tau, dim=1),
                reduction='sum', log_target=True) * (tau * tau) / output_kd.numel()
        else:
            distill_loss = F.cross_entropy(output_kd, teacher_output.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distill_loss * self.alpha


class Teacher(DistillationTeacher):
    """timm's ``DistillationTeacher``, frozen and always in eval mode, called on the student's (normalized) inputs.

    The weights come from ``checkpoint`` (a timm / train.py / DeiT file) or else the model's pretrained ones, which
    must then have ``num_classes`` outputs. Inputs are re-normalized from the student's ``mean`` / ``std`` to the
    teacher's.
    """

    def __init__(self, model_name, num_classes, mean, std, checkpoint='', device=None):
        pretrained_classes = None if checkpoint else get_pretrained_cfg_value(model_name, 'num_classes')
        if not checkpoint and pretrained_classes != num_classes:
            raise ValueError(f'the pretrained {model_name} has {pretrained_classes} classes, the student '
                             f'{num_classes}: pass a --teacher-checkpoint with {num_classes}')
        super().__init__(model_name, num_classes=num_classes, pretrained_path=checkpoint or None, device=device)
        self.requires_grad_(False)
        self.eval()
        self.register_buffer('student_mean', torch.tensor(mean, device=device).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('student_std', torch.tensor(std, device=device).view(1, -1, 1, 1), persistent=False)

    def train(self, mode=True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, input):
        return self.model(self.normalize_input(input, self.student_mean, self.student_std))


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, epoch, num_updates, args, mixup_fn=None,
                    model_ema=None, scaler=None, start_batch=0, totals=None, rng_state=None, save_fn=None,
                    teacher=None, num_epochs=None):
    """One pass over ``loader``, from batch ``start_batch`` (a group start) on when resuming inside the epoch.

    Every ``--grad-accum-steps`` batches make one update (``model.no_sync()``, where the model has it, skips the
    DDP gradient all-reduce before a group's last batch); each batch loss is divided by its group's size, so a
    shorter last group of the epoch is the mean of its own batches. ``totals`` are the epoch's running sums (loss,
    samples, correct, lr, updates), kept in mid-epoch checkpoints; ``rng_state`` is restored once the loader
    iterator exists; ``save_fn(batch_idx, num_updates, totals)`` runs every ``--checkpoint-interval`` updates.
    ``teacher`` (with a ``DistillationLoss``) gives the distillation logits. Returns mean loss, train top-1 (None
    under mixup), mean lr (all reduced over the ranks) and the update count.
    """
    model.train()
    device = torch.device(args.device)
    autocast = amp_autocast(device, args.amp, args.amp_dtype)
    totals = dict(totals or dict(loss=0., count=0., correct=0., lr=0., updates=0.))
    accum_steps = args.grad_accum_steps
    num_batches = len(loader)
    bar = tqdm(total=num_batches, initial=start_batch, desc=f'train {epoch + 1}/{num_epochs or args.epochs}',
               leave=False, disable=args.no_progress or args.rank != 0, dynamic_ncols=True)
    batches = iter(loader)
    if rng_state is not None:
        set_rng_state(rng_state)
    optimizer.zero_grad(set_to_none=True)
    for batch_idx, (input, target) in enumerate(batches, start=start_batch):
        group_start = batch_idx - batch_idx % accum_steps
        group_size = min(accum_steps, num_batches - group_start)
        need_update = batch_idx + 1 == group_start + group_size
        input, target = input.to(device), target.to(device)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        hard_target = target
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)

        no_sync = model.no_sync() if not need_update and hasattr(model, 'no_sync') else nullcontext()
        with no_sync:
            with autocast:
                output = model(input)
                if teacher is None:
                    loss = loss_fn(output, target)
                else:
                    loss = loss_fn(output, target, teacher(input))  # no_grad, eval mode, in the same autocast
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise RuntimeError(f'loss is {loss_value} at epoch {epoch}, stopping')
            if group_size > 1:
                loss = loss / group_size
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        lr = optimizer.param_groups[0]['lr']
        if need_update:
            if scaler is not None:
                if args.clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                if args.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if model_ema is not None:
                model_ema.update(unwrap_model(model), step=num_updates)
            if scheduler is not None:
                scheduler.step_update(num_updates=num_updates)  # no-op unless the schedule steps per update
            totals['lr'] += lr
            totals['updates'] += 1

        n = input.size(0)
        totals['loss'] += loss_value * n
        totals['count'] += n
        postfix = dict(loss=f'{totals["loss"] / totals["count"]:.4f}')
        if mixup_fn is None:
            logits = output[0] if isinstance(output, (tuple, list)) else output
            totals['correct'] += accuracy(logits.detach().float(), hard_target)[0].item() * n / 100
            postfix['acc'] = f'{100 * totals["correct"] / totals["count"]:.2f}'
        postfix['lr'] = f'{lr:.2e}'
        bar.set_postfix(postfix)
        bar.update()

        if not need_update:
            continue
        if (save_fn is not None and args.checkpoint_interval and num_updates % args.checkpoint_interval == 0
                and batch_idx + 1 < num_batches):
            save_fn(batch_idx + 1, num_updates, totals)
        if args.stop_after_updates and num_updates >= args.stop_after_updates:
            bar.close()
            raise SystemExit(f'stopped after update {num_updates} (--stop-after-updates)')
    bar.close()

    loss_sum, count, correct, lr_sum, updates = all_reduce_sum(
        [totals[k] for k in ('loss', 'count', 'correct', 'lr', 'updates')], device)
    return dict(
        loss=loss_sum / max(count, 1),
        top1=100 * correct / max(count, 1) if mixup_fn is None else None,
        lr=lr_sum / max(updates, 1),
        num_updates=num_updates,
    )


@torch.no_grad()
def evaluate(model, loader, device, amp=False, channels_last=False, desc='eval', progress=True,
             amp_dtype='bfloat16'):
    """Mean cross-entropy and top-1 / top-5 accuracy (percent) of ``model`` over ``loader``.

    Under ``torch.distributed`` the sums are reduced over the ranks; the padding timm's
    ``OrderedDistributedSampler`` adds to even out the ranks is left out, so every image counts once.
    """
    model.eval()
    device = torch.device(device)
    autocast = amp_autocast(device, amp, amp_dtype)
    valid = getattr(loader.sampler, 'num_valid_samples', None)
    loss_sum = correct1 = correct5 = count = 0.
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for input, target in bar:
        input, target = input.to(device), target.to(device)
        if channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with autocast:
            output = model(input)
        output = output.float()
        if valid is not None:
            keep = max(0, min(input.size(0), valid - int(count)))
            output, target = output[:keep], target[:keep]
        if target.numel() == 0:
            continue
        top = output.topk(min(5, output.size(1)), dim=1).indices.eq(target[:, None])
        loss_sum += nn.functional.cross_entropy(output, target, reduction='sum').item()
        correct1 += top[:, :1].sum().item()
        correct5 += top.sum().item()
        count += target.numel()
        bar.set_postfix(loss=f'{loss_sum / count:.4f}', top1=f'{100 * correct1 / count:.2f}')
    loss_sum, correct1, correct5, count = all_reduce_sum([loss_sum, correct1, correct5, count], device)
    count = max(count, 1)
    return dict(loss=loss_sum / count, top1=100 * correct1 / count, top5=100 * correct5 / count)


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
        return [{k: (int(v) if k == 'epoch' else float(v)) if v != '' else None for k, v in row.items()}
                for row in csv.DictReader(f)]


def write_summary(path, rows, fields=SUMMARY_FIELDS):
    tmp_path = path + '.tmp'
    with open(tmp_path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
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
    if any(row.get('ema_eval_top1') is not None for row in rows):
        ax_acc.plot(epochs, [row.get('ema_eval_top1') for row in rows], 'o--', label='EMA top-1')
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
    init_distributed(args)
    primary = args.rank == 0
    log = print if primary else (lambda *a, **k: None)
    device = torch.device(args.device)
    random_seed(args.seed, args.rank)
    output_dir = args.output or os.path.join(
        'output', 'train', f'{args.model}-{datetime.now().strftime("%Y%m%d-%H%M%S")}')
    if args.distributed:  # one run folder for all ranks
        names = [output_dir]
        dist.broadcast_object_list(names, src=0)
        output_dir = names[0]
    if primary:
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
    if args.distributed and args.sync_bn:
        model = convert_sync_batchnorm(model)
        num_sync_bn = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        if num_sync_bn and device.type not in SYNC_BN_DEVICES:
            raise SystemExit(f'--sync-bn: {num_sync_bn} BatchNorm layers of {args.model} were converted to '
                             f'SyncBatchNorm, which torch runs on {"/".join(SYNC_BN_DEVICES)} only, not on '
                             f'{device.type}; leave --sync-bn out (the BatchNorm statistics of the ranks are then '
                             f'averaged at each epoch end)')
        log(f'--sync-bn: {num_sync_bn} BatchNorm layers synchronized across the ranks')
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    num_params = sum(p.numel() for p in model.parameters())
    # the EMA copy is taken before the DDP / compile wrappers, as in timm
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) \
        if args.model_ema else None

    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    loader_kwargs = dict(
        input_size=data_config['input_size'],
        batch_size=args.batch_size,
        interpolation=data_config['interpolation'],
        mean=data_config['mean'],
        std=data_config['std'],
        num_workers=args.workers,
        distributed=args.distributed,
        use_prefetcher=False,
        pin_memory=device.type == 'cuda',
        device=device,
    )
    loader_train = create_loader(
        dataset_train, is_training=True, no_aug=args.no_aug, scale=args.scale, hflip=args.hflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, re_prob=args.reprob, re_mode=args.remode,
        re_count=args.recount, num_aug_repeats=args.aug_repeats if args.distributed else 0, **loader_kwargs)
    loader_eval = create_loader(dataset_eval, crop_pct=data_config['crop_pct'], **loader_kwargs)
    base_sampler = loader_train.batch_sampler.sampler
    if args.aug_repeats and not args.distributed:
        # timm's create_loader takes repeats only with distributed=True; the sampler itself works on one process
        base_sampler = RepeatAugSampler(dataset_train, num_replicas=1, rank=0, num_repeats=args.aug_repeats)
    train_sampler = EpochSampler(base_sampler, args.seed)
    loader_train.batch_sampler.sampler = train_sampler

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
            num_classes=num_classes)
        train_loss_fn = SoftTargetCrossEntropy()  # mixup already folds label smoothing into the targets
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    teacher = None
    if args.distill_teacher:
        teacher = Teacher(args.distill_teacher, num_classes, data_config['mean'], data_config['std'],
                          checkpoint=args.teacher_checkpoint, device=device)
        train_loss_fn = DistillationLoss(train_loss_fn, args.distill_type, args.distill_alpha, args.distill_tau)
        if hasattr(model, 'set_distilled_training'):  # timm's distilled DeiTs return (cls, dist) when training
            model.set_distilled_training(True)

    opt_kwargs = {}
    if args.opt_eps is not None:
        opt_kwargs['eps'] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs['betas'] = args.opt_betas
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, **opt_kwargs)
    scaler = torch.amp.GradScaler(device.type) if args.amp and args.amp_dtype == 'float16' else None
    accum_steps = args.grad_accum_steps
    updates_per_epoch = (len(loader_train) + accum_steps - 1) // accum_steps
    # num_epochs adds the cooldown (cosine / tanh / poly schedules), as timm's train.py trains it
    scheduler, num_epochs = create_scheduler_v2(
        optimizer,
        sched=args.sched,
        num_epochs=args.epochs,
        min_lr=args.min_lr,
        decay_rate=args.decay_rate,
        warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs,
        cooldown_epochs=args.cooldown_epochs,
        step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=updates_per_epoch,
    )

    start_epoch, start_batch, resume_rank_state = 0, 0, None
    best_top1, best_epoch = None, None
    summary_path = os.path.join(output_dir, 'summary.csv')
    if args.resume:
        checkpoint = torch.load(args.resume, map_location='cpu', weights_only=True)
        model.load_state_dict(checkpoint['state_dict'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        old_args = checkpoint.get('args', {})
        old_args = {**LATER_ARG_DEFAULTS, **old_args}
        changed = [k for k in SCHEDULE_ARGS if old_args.get(k) != getattr(args, k)]
        if scheduler is not None and checkpoint.get('scheduler') is not None and not changed:
            scheduler.load_state_dict(checkpoint['scheduler'])
        elif changed:
            log(f'schedule arguments changed ({", ".join(changed)}): the lr follows the new schedule')
        if model_ema is not None:
            if checkpoint.get('state_dict_ema') is not None:
                model_ema.module.load_state_dict(checkpoint['state_dict_ema'])
            else:
                log('the checkpoint has no EMA weights: the EMA starts from the resumed weights')
                model_ema.module.load_state_dict(checkpoint['state_dict'])
        if scaler is not None and checkpoint.get('scaler') is not None:
            scaler.load_state_dict(checkpoint['scaler'])
        best_top1, best_epoch = checkpoint.get('best_metric'), checkpoint.get('best_epoch')
        if checkpoint.get('batch_idx'):  # saved inside an epoch: continue with its next update
            start_epoch, start_batch = checkpoint['epoch'], checkpoint['batch_idx']
            rank_states = checkpoint.get('rank_states') or []
            if (len(rank_states) == args.world_size and old_args.get('batch_size') == args.batch_size
                    and old_args.get('grad_accum_steps') == accum_steps):
                resume_rank_state = rank_states[args.rank]
            else:
                log('the checkpoint position was saved with another world size, batch size or accumulation: '
                    'restarting its epoch')
                start_batch = 0
            log(f'resumed from {args.resume}, continuing at epoch {start_epoch + 1}, update {start_batch + 1}')
        else:
            start_epoch = checkpoint['epoch'] + 1
            log(f'resumed from {args.resume}, continuing at epoch {start_epoch + 1}')
    rows = [row for row in read_summary(summary_path) if row['epoch'] < start_epoch] if args.resume else []
    summary_fields = SUMMARY_FIELDS + (EMA_SUMMARY_FIELDS if model_ema is not None else ())

    num_updates = start_epoch * updates_per_epoch + start_batch // accum_steps  # mid-epoch saves are at group ends
    # move the schedule to where this run starts (a fresh run is already at 0)
    if scheduler is not None and num_updates > 0:
        if args.sched_on_updates:
            scheduler.step_update(num_updates)
        else:
            scheduler.step(start_epoch)

    train_model = model
    if args.distributed:
        device_ids = [device.index] if device.type == 'cuda' else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if args.torch_compile:
        train_model = torch.compile(train_model, backend=args.torch_compile_backend)

    log(f'{args.model}: {num_params / 1e6:.2f}M params, {num_classes} classes, input {data_config["input_size"]}, '
        f'{len(dataset_train)} train / {len(dataset_eval)} val images, device {device}, output {output_dir}')
    log(f'batch {args.batch_size} x {args.world_size} ranks x {accum_steps} accumulation steps = '
        f'{args.batch_size * args.world_size * accum_steps} images per update, {updates_per_epoch} updates/epoch, '
        f'{num_epochs} epochs{f" ({args.cooldown_epochs} of cooldown)" if num_epochs > args.epochs else ""}')
    if teacher is not None:
        log(f'DeiT {args.distill_type} distillation from {args.distill_teacher} '
            f'({args.teacher_checkpoint or "pretrained"}), alpha {args.distill_alpha}, tau {args.distill_tau}')

    def checkpoint_state(epoch, batch_idx=None, **extra):
        state = dict(
            epoch=epoch,
            batch_idx=batch_idx,
            arch=args.model,
            state_dict=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            args=vars(args),
            best_metric=best_top1,
            best_epoch=best_epoch,
            **extra,
        )
        if model_ema is not None:
            state['state_dict_ema'] = model_ema.module.state_dict()
        if scaler is not None:
            state['scaler'] = scaler.state_dict()
        return state

    def save_mid_epoch(epoch):
        def save(batch_idx, updates, totals):
            rank_state = dict(rng=get_rng_state(), totals=dict(totals))
            rank_states = [rank_state]
            if args.distributed:
                rank_states = [None] * args.world_size
                dist.all_gather_object(rank_states, rank_state)
            if primary:
                save_checkpoint(checkpoint_state(epoch, batch_idx, rank_states=rank_states), output_dir, False)
        return save

    eval_metrics = ema_metrics = None
    progress = primary and not args.no_progress
    for epoch in range(start_epoch, num_epochs):
        epoch_start = time.perf_counter()
        # fixed per-epoch randomness, so that a run resumed inside the epoch draws what the first run drew
        random_seed(args.seed + (epoch + 1) * args.world_size, args.rank)
        skip = start_batch if epoch == start_epoch else 0
        train_sampler.set_epoch(epoch, skip * args.batch_size)
        train_metrics = train_one_epoch(
            train_model, loader_train, train_loss_fn, optimizer, scheduler, epoch, num_updates, args,
            mixup_fn=mixup_fn, model_ema=model_ema, scaler=scaler, start_batch=skip,
            totals=resume_rank_state['totals'] if skip and resume_rank_state else None,
            rng_state=resume_rank_state['rng'] if skip and resume_rank_state else None,
            save_fn=save_mid_epoch(epoch), teacher=teacher, num_epochs=num_epochs)
        num_updates = train_metrics['num_updates']
        if args.distributed and not args.sync_bn:
            distribute_bn(model, args.world_size, reduce=True)  # average the BatchNorm statistics of the ranks
        eval_metrics = evaluate(
            train_model, loader_eval, device, amp=args.amp, amp_dtype=args.amp_dtype,
            channels_last=args.channels_last, desc=f'eval  {epoch + 1}/{num_epochs}', progress=progress)
        if model_ema is not None:
            ema_metrics = evaluate(
                model_ema.module, loader_eval, device, amp=args.amp, amp_dtype=args.amp_dtype,
                channels_last=args.channels_last, desc=f'ema   {epoch + 1}/{num_epochs}', progress=progress)
        if scheduler is not None:
            scheduler.step(epoch + 1, eval_metrics['top1'])  # no-op when the schedule steps per update

        row = dict(
            epoch=epoch,
            train_loss=train_metrics['loss'],
            eval_loss=eval_metrics['loss'],
            eval_top1=eval_metrics['top1'],
            eval_top5=eval_metrics['top5'],
            lr=train_metrics['lr'],
        )
        if ema_metrics is not None:
            row.update(ema_eval_loss=ema_metrics['loss'], ema_eval_top1=ema_metrics['top1'],
                       ema_eval_top5=ema_metrics['top5'])
        rows.append(row)

        is_best = best_top1 is None or eval_metrics['top1'] > best_top1
        if is_best:
            best_top1, best_epoch = eval_metrics['top1'], epoch
        if primary:
            write_summary(summary_path, rows, summary_fields)
            save_checkpoint(checkpoint_state(epoch, metric=eval_metrics['top1']), output_dir, is_best)

        train_top1 = '' if train_metrics['top1'] is None else f'train_acc {train_metrics["top1"]:6.2f}  '
        ema_top1 = '' if ema_metrics is None else f'ema_top1 {ema_metrics["top1"]:6.2f}  '
        log(f'epoch {epoch + 1:3d}/{num_epochs}  train_loss {train_metrics["loss"]:.4f}  {train_top1}'
            f'eval_loss {eval_metrics["loss"]:.4f}  top1 {eval_metrics["top1"]:6.2f}  '
            f'top5 {eval_metrics["top5"]:6.2f}  {ema_top1}lr {train_metrics["lr"]:.2e}  '
            f'{time.perf_counter() - epoch_start:5.1f}s', flush=True)

    if rows and primary:
        plot_curves(rows, os.path.join(output_dir, 'curves.png'))
    if args.distributed:
        dist.barrier()
    final = rows[-1] if rows else {}
    return dict(
        best_top1=best_top1,
        best_epoch=best_epoch,
        final_top1=final.get('eval_top1'),
        final_top5=final.get('eval_top5'),
        final_eval_loss=final.get('eval_loss'),
        final_ema_top1=final.get('ema_eval_top1'),
        epochs_run=max(0, num_epochs - start_epoch),
        start_epoch=start_epoch,
        start_batch=start_batch,
        num_classes=num_classes,
        num_params=num_params,
        output=output_dir,
    )


if __name__ == '__main__':
    main()
