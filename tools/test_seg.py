#!/usr/bin/env python
"""Evaluate a segmentation checkpoint (mIoU, mAcc, aAcc) and write the metrics as json.

    python tools/test_seg.py CONFIG work_dirs/<name>/iter_160000.pth --data-root data/ade/ADEChallengeData2016
    python tools/test_seg.py CONFIG CKPT --tta          # multi-scale + flip, as papers' "MS" columns

Needs the ``seg`` extra: ``pip install "visionmix[seg]"``.
"""
import argparse
import json
import os

from visionmix.segmentation.runner import DictAction, load_config, load_local_checkpoints_fully


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='mmseg config, e.g. one under configs/ade20k')
    parser.add_argument('checkpoint', help='checkpoint written by tools/train_seg.py')
    parser.add_argument('--work-dir', help='where logs go')
    parser.add_argument('--data-root', help='dataset root (overrides the config)')
    parser.add_argument('--out', help='json file for the metrics (default <work-dir>/test_metrics.json)')
    parser.add_argument('--tta', action='store_true', help="test-time augmentation: the config's tta_pipeline")
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

    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint {args.checkpoint!r} does not exist')
    # the checkpoint holds every weight: no pretrained backbone download
    cfg = load_config(args.config, args.work_dir, args.cfg_options, args.data_root, launcher=args.launcher,
                      no_pretrained=True)
    cfg.load_from = args.checkpoint
    if args.tta:
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    runner = Runner.from_cfg(cfg)
    metrics = {key: float(value) for key, value in runner.test().items()}
    if runner.rank == 0:
        out = args.out or os.path.join(cfg.work_dir, 'test_metrics.json')
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, 'w') as f:
            json.dump(dict(config=args.config, checkpoint=args.checkpoint, tta=args.tta, metrics=metrics), f, indent=2)
        print(f"mIoU {metrics.get('mIoU', float('nan')):.2f} -> {out}")
    return metrics


if __name__ == '__main__':
    main()
