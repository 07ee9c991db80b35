"""Config preparation shared by ``tools/train_seg.py`` and ``tools/test_seg.py`` (mmengine ``Runner`` based)."""
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.config import Config, DictAction

__all__ = ['DictAction', 'load_config', 'set_data_root', 'plot_training_curves', 'load_local_checkpoints_fully']


def load_local_checkpoints_fully() -> None:
    """Let mmengine read its own local checkpoints under torch >= 2.6.

    mmengine 0.10.7 saves its logging state (``HistoryBuffer`` holding numpy arrays) in every checkpoint and reads
    checkpoints with ``torch.load``'s default, which became ``weights_only=True`` in torch 2.6 and refuses them, so
    ``--resume`` and ``tools/test_seg.py`` would fail on the checkpoints ``tools/train_seg.py`` writes. This replaces
    mmengine's local-file loader with one that unpickles fully: load only checkpoints you trust. Remote URLs and
    the backbones' pretrained weights (timm's loaders) are not affected.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    def load_local(filename, map_location):
        filename = os.path.expanduser(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        return torch.load(filename, map_location=map_location, weights_only=False)

    CheckpointLoader.register_scheme(prefixes='', loader=load_local, force=True)


def set_data_root(cfg: Config, data_root: str) -> None:
    """Point the train / val / test datasets at ``data_root`` (an ``ADEChallengeData2016``-style folder)."""
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg.get(key)
        if loader is not None:
            loader.dataset.data_root = str(data_root)


def load_config(
        path: str,
        work_dir: Optional[str] = None,
        cfg_options: Optional[Dict] = None,
        data_root: Optional[str] = None,
        amp: bool = False,
        launcher: str = 'none',
        no_pretrained: bool = False,
) -> Config:
    """Read a segmentation config and apply the command-line overrides the tools share.

    ``amp`` turns a plain ``OptimWrapper`` into ``AmpOptimWrapper`` (dynamic loss scale). Without CUDA an
    ``AmpOptimWrapper`` cannot run (mmengine refuses it), so it falls back to fp32 with a printed note.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'config {path!r} does not exist')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.launcher = launcher
    cfg.work_dir = work_dir or cfg.get('work_dir') or os.path.join('work_dirs', Path(path).stem)
    if data_root is not None:
        set_data_root(cfg, data_root)
    if no_pretrained:
        cfg.model.backbone.pretrained = False
        cfg.model.backbone.pop('checkpoint', None)
    optim = cfg.get('optim_wrapper')
    if optim is not None:
        if amp and optim.get('type', 'OptimWrapper') == 'OptimWrapper':
            optim.type = 'AmpOptimWrapper'
            optim.setdefault('loss_scale', 'dynamic')
        if optim.get('type') == 'AmpOptimWrapper' and not torch.cuda.is_available():
            print('note: mixed precision (AmpOptimWrapper) needs CUDA; training in fp32 on this machine')
            optim.type = 'OptimWrapper'
            optim.pop('loss_scale', None)
    return cfg


def _read_scalars(log_dir: Path) -> List[Dict]:
    files = sorted(log_dir.glob('**/vis_data/scalars.json'))
    if not files:
        return []
    with open(files[-1]) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(work_dir: str, keys: Sequence[str] = ('loss', 'mIoU')) -> Optional[Path]:
    """Plot training loss and validation mIoU against iterations from mmengine's scalar log; returns the png."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    records = _read_scalars(Path(work_dir))
    series = {k: [(r['step'], r[k]) for r in records if k in r and 'step' in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker='o' if len(steps) < 30 else None)
        ax.set_xlabel('iteration')
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(work_dir) / 'curves.png'
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
