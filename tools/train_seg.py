#!/usr/bin/env python
"""Train a semantic segmentation model (mmsegmentation) with a visionmix backbone.

    python tools/train_seg.py configs/ade20k/upernet_nat_tiny_8xb2-160k_ade20k-512x512.py \
        --data-root data/ade/ADEChallengeData2016
    torchrun --nproc_per_node 8 tools/train_seg.py CONFIG --launcher pytorch      # the published 8-GPU setting

Checkpoints, logs and ``curves.png`` (loss and mIoU against iterations) go to ``--work-dir``
(default ``work_dirs/<config name>``); ``--resume`` continues from the last checkpoint there.
Needs the ``seg`` extra: ``pip install "visionmix[seg]"``.
"""
import argparse
import os

from visionmix.segmentation.runner import DictAction, load_config, load_local_checkpoints_fully, plot_training_curves


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='mmseg config, e.g. one under configs/ade20k')
    parser.add_argument('--work-dir', help='where logs and checkpoints go')
    parser.add_argument('--data-root', help='dataset root (overrides the config; ADE20K: ADEChallengeData2016)')
    parser.add_argument('--resume', nargs='?', const='auto', default=None,
                        help='resume from the latest checkpoint in the work dir, or from the given checkpoint')
    parser.add_argument('--amp', action='store_true', help='mixed precision (dynamic loss scale)')
    parser.add_argument('--no-pretrained', action='store_true', help='start the backbone from random weights')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='config overrides, key=value')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv=None):
    args = parse_args(argv)
    from mmengine.runner import Runner

    load_local_checkpoints_fully()

    cfg = load_config(args.config, args.work_dir, args.cfg_options, args.data_root, args.amp, args.launcher,
                      args.no_pretrained)
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    runner = Runner.from_cfg(cfg)
    runner.train()
    if runner.rank == 0:
        plot = plot_training_curves(cfg.work_dir)
        if plot is not None:
            print(f'training curves: {plot}')
    return runner


if __name__ == '__main__':
    main()
