"""A tiny dataset in ADE20K's layout, for smoke tests of the segmentation tools.

``ADEChallengeData2016/{images,annotations}/{training,validation}``: RGB jpgs and 8-bit png label maps where 0 is
"other" (ignored after ``reduce_zero_label``) and 1..150 are the classes. Each image is a background class with a
few axis-aligned rectangles of other classes, each class drawn in its own colour plus noise, so a model can learn it.
"""
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ['write_synthetic_ade20k']


def _sample(rng: np.random.Generator, size: int, classes: np.ndarray, palette: np.ndarray):
    label = np.full((size, size), classes[0], dtype=np.uint8)
    for cls in rng.choice(classes[1:], size=rng.integers(1, 4), replace=False):
        h, w = rng.integers(size // 4, size // 2, size=2)
        top, left = rng.integers(0, size - h), rng.integers(0, size - w)
        label[top:top + h, left:left + w] = cls
    label[rng.random((size, size)) < 0.01] = 0  # a few "other" pixels, ignored by the loss and the metric
    image = palette[label].astype(np.float32) + rng.normal(0, 12, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_synthetic_ade20k(root, num_train: int = 8, num_val: int = 4, size: int = 64, num_classes: int = 5,
                           seed: int = 0) -> Path:
    """Write the dataset under ``root/ADEChallengeData2016`` and return that folder (the configs' data root)."""
    if not 2 <= num_classes <= 150:
        raise ValueError(f'num_classes must be in [2, 150] (ADE20K has 150), got {num_classes}')
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(151, 3))
    classes = np.arange(1, num_classes + 1)
    data_root = Path(root) / 'ADEChallengeData2016'
    for split, count in (('training', num_train), ('validation', num_val)):
        (data_root / 'images' / split).mkdir(parents=True, exist_ok=True)
        (data_root / 'annotations' / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label = _sample(rng, size, classes, palette)
            name = f'ADE_{split[:5]}_{i:08d}'
            Image.fromarray(image).save(data_root / 'images' / split / f'{name}.jpg', quality=95)
            Image.fromarray(label).save(data_root / 'annotations' / split / f'{name}.png')
    return data_root
