"""Parameter and FLOP counts of the visionmix models.

``model_table()`` builds each model on the ``meta`` device and counts the FLOPs of one forward pass with
``torch.utils.flop_counter.FlopCounterMode``, so no weights are allocated and no arithmetic is run.
"""
from typing import Dict, Iterable, List, Optional, Sequence

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode


def visionmix_model_names() -> List[str]:
    """Every timm-registered model whose entrypoint is defined in a ``visionmix.*`` module."""
    import visionmix  # noqa: F401  (registers the models)

    return [
        name for name in timm.list_models()
        if getattr(timm.models.model_entrypoint(name), '__module__', '').startswith('visionmix.')
    ]


def _count(name: str, device: str, input_size: Optional[Sequence[int]]) -> Dict:
    with torch.device(device):
        model = timm.create_model(name)
    model.eval()
    size = tuple(input_size or model.pretrained_cfg.get('input_size', (3, 224, 224)))
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros((1, *size), device=device))
    return dict(name=name, params=params / 1e6, gflops=counter.get_total_flops() / 2e9, input_size=size)


def model_table(names: Optional[Iterable[str]] = None, input_size: Optional[Sequence[int]] = None) -> List[Dict]:
    """Params (millions) and GFLOPs of one image's forward pass for each model.

    GFLOPs are multiply-accumulates / 1e9 (the counter's FLOPs / 2e9), the convention of the papers these models
    come from. Each model is built and run on the ``meta`` device; models that cannot run there are counted on
    CPU under ``torch.no_grad()``.

    Args:
        names: model names, default every visionmix model (``visionmix_model_names()``).
        input_size: (C, H, W) for every model, default each model's ``pretrained_cfg['input_size']``.

    Returns:
        One dict per model: ``name``, ``params`` (M), ``gflops``, ``input_size``.
    """
    names = visionmix_model_names() if names is None else list(names)
    rows = []
    for name in names:
        try:
            row = _count(name, 'meta', input_size)
        except Exception:
            row = _count(name, 'cpu', input_size)
        rows.append(row)
    return rows


def format_table(rows: Iterable[Dict]) -> str:
    """``model_table`` rows as a markdown table."""
    lines = [
        '| model | params (M) | GFLOPs | input size |',
        '|:--|--:|--:|:--|',
    ]
    for row in rows:
        size = 'x'.join(str(s) for s in row['input_size'][1:])
        lines.append(f"| {row['name']} | {row['params']:.2f} | {row['gflops']:.3f} | {size} |")
    return '\n'.join(lines)
