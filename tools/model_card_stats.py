#!/usr/bin/env python3
"""Print the measured columns of a model card's variants table as markdown rows.

    python tools/model_card_stats.py 'mavit_*' 'ravlt_*'

For every visionmix model matching a pattern (``test_*`` models excluded) the model is built from its
default pretrained cfg on the ``meta`` device, so no weights are allocated and nothing is computed:

* params (M): ``sum(p.numel() for p in model.parameters()) / 1e6``;
* GMACs: one forward pass of a ``(1, 3, H, W)`` meta tensor at the cfg ``input_size`` under
  ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per multiply-add, divided by 2e9
  (matmuls, convolutions and attention; element-wise ops, norms and softmax are not counted);
* pretrained tags (``timm.list_pretrained``) and the weights license of the pretrained cfgs.

A pretrained tag whose classifier differs from the default one (e.g. ``in22k`` with 21841 classes) gets a row
of its own, named ``model.tag`` and built as ``timm.create_model('model.tag')``.
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import timm  # noqa: E402
import torch  # noqa: E402
from timm.models import get_pretrained_cfg, model_entrypoint  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from tqdm import tqdm  # noqa: E402

import visionmix  # noqa: E402,F401  (registers the models)

HEADER = ('| model | input | params (M) | GMACs | pretrained tags | weights license |\n'
          '|:--|:-:|--:|--:|:--|:--|')


def visionmix_models(pattern: str) -> List[str]:
    """Registered visionmix models matching ``pattern``, without the ``test_*`` ones."""
    return [name for name in timm.list_models(pattern)
            if model_entrypoint(name).__module__.startswith('visionmix.') and not name.startswith('test_')]


def count(name: str) -> Dict:
    """Params and multiply-adds of one forward pass at the pretrained cfg's input size, on ``meta``."""
    with torch.device('meta'):
        model = timm.create_model(name)
    model.eval()
    _, height, width = model.pretrained_cfg['input_size']
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, height, width, device='meta'))
    return dict(params=sum(p.numel() for p in model.parameters()), macs=counter.get_total_flops() / 2,
                height=height, width=width)


def _license(tags: List[str]) -> str:
    licenses = sorted({get_pretrained_cfg(t).license or 'unknown' for t in tags})
    if not licenses:
        return 'no released weights'
    return ', '.join('not stated by the authors' if lic == 'unknown' else lic for lic in licenses)


def rows_for(name: str) -> List[Dict]:
    """One row for the model (its default-head tags) and one per tag with another classifier."""
    default_classes = get_pretrained_cfg(name).num_classes
    tags = timm.list_pretrained(f'{name}.*')
    other = [t for t in tags if get_pretrained_cfg(t).num_classes != default_classes]
    rows = [dict(name=name, tags=[t for t in tags if t not in other])]
    rows += [dict(name=t, tags=[t]) for t in other]
    return rows


def format_row(row: Dict, stats: Dict) -> str:
    size = str(stats['height']) if stats['height'] == stats['width'] else f"{stats['height']}x{stats['width']}"
    tags = ', '.join(f"`{t.split('.', 1)[1]}`" for t in row['tags']) or '–'
    return (f"| `{row['name']}` | {size} | {stats['params'] / 1e6:.2f} | {stats['macs'] / 1e9:.2f} | {tags} | "
            f"{_license(row['tags'])} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('patterns', nargs='+', help="timm name patterns, e.g. 'mavit_*'")
    args = parser.parse_args(argv)
    names = []
    for pattern in args.patterns:
        names += [n for n in visionmix_models(pattern) if n not in names]
    if not names:
        parser.error(f"no visionmix model matches {args.patterns}")
    rows = [row for name in names for row in rows_for(name)]
    lines = [format_row(row, count(row['name'])) for row in tqdm(rows, desc='measuring', file=sys.stderr)]
    print(HEADER)
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())

