"""The handwritten digits that ship with scikit-learn, as an ImageFolder dataset.

``sklearn.datasets.load_digits()`` holds 1,797 real 8x8 scans of the digits 0-9 (UCI optdigits test set),
bundled with scikit-learn, so nothing is downloaded.
"""
import json
import os
from typing import Dict, Optional

import numpy as np

SPLITS = ('train', 'validation')
NUM_CLASSES = 10
_MANIFEST = 'export.json'


def export_digits(
        root: str,
        val_fraction: float = 0.2,
        seed: int = 0,
        image_size: Optional[int] = None,
) -> Dict[str, int]:
    """Write the scikit-learn digits as RGB PNGs in ImageFolder layout.

    Files land at ``root/train/<digit>/<i>.png`` and ``root/validation/<digit>/<i>.png`` with a stratified,
    seed-deterministic split. Pixel values 0..16 are scaled to 0..255, images are upscaled (bicubic) to
    ``image_size`` when given. A complete export with the same settings already in ``root`` is left as is.

    Returns:
        Image counts, ``{'train': n_train, 'validation': n_val, 'total': n_total}``.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    settings = dict(val_fraction=val_fraction, seed=seed, image_size=image_size)
    manifest_path = os.path.join(root, _MANIFEST)
    existing = _read_manifest(manifest_path)
    if existing is not None and existing['settings'] == settings and _files_complete(root, existing['counts']):
        return existing['counts']

    digits = load_digits()
    images = np.round(digits.images * (255. / 16.)).clip(0, 255).astype(np.uint8)
    indices = np.arange(len(images))
    train_idx, val_idx = train_test_split(
        indices, test_size=val_fraction, random_state=seed, stratify=digits.target)

    counts = {}
    for split, split_idx in zip(SPLITS, (train_idx, val_idx)):
        for label in range(NUM_CLASSES):
            os.makedirs(os.path.join(root, split, str(label)), exist_ok=True)
        for i in sorted(split_idx):
            img = Image.fromarray(np.repeat(images[i][:, :, None], 3, axis=2))
            if image_size:
                img = img.resize((image_size, image_size), Image.BICUBIC)
            img.save(os.path.join(root, split, str(digits.target[i]), f'{i}.png'))
        counts[split] = len(split_idx)
        _remove_stale(root, split, {(str(digits.target[i]), f'{i}.png') for i in split_idx})
    counts['total'] = len(images)

    # the manifest is written last so an interrupted export is redone
    tmp_path = manifest_path + '.tmp'
    with open(tmp_path, 'w') as f:
        json.dump(dict(settings=settings, counts=counts), f)
    os.replace(tmp_path, manifest_path)
    return counts


def _read_manifest(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _count_pngs(root, split):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        return 0
    return sum(
        sum(name.endswith('.png') for name in os.listdir(os.path.join(split_dir, label)))
        for label in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, label))
    )


def _files_complete(root, counts):
    return all(_count_pngs(root, split) == counts.get(split) for split in SPLITS)


def _remove_stale(root, split, keep):
    """Remove PNGs left by an export with other settings (a different split would leak val into train)."""
    split_dir = os.path.join(root, split)
    for label in os.listdir(split_dir):
        label_dir = os.path.join(split_dir, label)
        if not os.path.isdir(label_dir):
            continue
        for name in os.listdir(label_dir):
            if name.endswith('.png') and (label, name) not in keep:
                os.remove(os.path.join(label_dir, name))
