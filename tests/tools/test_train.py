"""tools/train.py, the digits export and the model table, all on CPU."""
import csv
import importlib.util
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import visionmix  # noqa: F401
from visionmix.data import export_digits
from visionmix.profile import format_table, model_table, visionmix_model_names

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_train_module():
    spec = importlib.util.spec_from_file_location('visionmix_tools_train', REPO_ROOT / 'tools' / 'train.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load_train_module()


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('digits')


@pytest.fixture(scope='module')
def digits_subset(digits_dir, tmp_path_factory):
    """30 train / 10 validation images per class, to keep the training runs to seconds."""
    export_digits(str(digits_dir))
    subset = tmp_path_factory.mktemp('digits_subset')
    for split, per_class in (('train', 30), ('validation', 10)):
        for label_dir in sorted((digits_dir / split).iterdir()):
            (subset / split / label_dir.name).mkdir(parents=True)
            for png in sorted(label_dir.glob('*.png'))[:per_class]:
                shutil.copy(png, subset / split / label_dir.name / png.name)
    return subset


def _train_args(data_dir, output, epochs, *extra):
    return [
        '--data-dir', str(data_dir), '--output', str(output), '--model', 'test_convnext', '--img-size', '32',
        '--crop-pct', '1', '--epochs', str(epochs), '-b', '32', '--lr', '3e-3', '--no-aug', '--smoothing', '0',
        '--workers', '0', '--device', 'cpu', '--seed', '0', '--no-progress', *extra,
    ]


def _summary(output):
    with open(output / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def test_export_digits(digits_dir):
    counts = export_digits(str(digits_dir))
    assert counts == {'train': 1437, 'validation': 360, 'total': 1797}
    for split in ('train', 'validation'):
        assert sorted(p.name for p in (digits_dir / split).iterdir()) == [str(i) for i in range(10)]
        assert sum(1 for _ in (digits_dir / split).glob('*/*.png')) == counts[split]
    train_files = {p.name for p in (digits_dir / 'train').glob('*/*.png')}
    val_files = {p.name for p in (digits_dir / 'validation').glob('*/*.png')}
    assert not train_files & val_files
    # stratified: every class is in the validation split at about its share
    for label_dir in (digits_dir / 'validation').iterdir():
        assert 30 <= len(list(label_dir.glob('*.png'))) <= 42

    from PIL import Image
    img = Image.open(next((digits_dir / 'train' / '0').glob('*.png')))
    assert img.mode == 'RGB' and img.size == (8, 8)
    assert np.asarray(img).max() > 200  # 0..16 scaled to 0..255

    # a second call finds the complete export and writes nothing
    mtimes = {p: p.stat().st_mtime_ns for p in digits_dir.glob('*/*/*.png')}
    assert export_digits(str(digits_dir)) == counts
    assert {p: p.stat().st_mtime_ns for p in digits_dir.glob('*/*/*.png')} == mtimes


def test_parse_args_config_and_overrides(tmp_path):
    config = tmp_path / 'config.yaml'
    config.write_text('model: test_vit\nbatch_size: 16\nlr: 0.01\nscale: [0.5, 1.0]\n')
    args = train.parse_args(['-c', str(config), '--data-dir', 'x', '-b', '8', '--model-kwargs', 'depth=2',
                             'dims=[8, 16]', 'act=gelu'])
    assert args.model == 'test_vit' and args.lr == 0.01 and args.scale == (0.5, 1.0)
    assert args.batch_size == 8  # the command line wins over the config
    assert args.model_kwargs == {'depth': 2, 'dims': [8, 16], 'act': 'gelu'}
    # a config sets defaults for that call only
    assert train.parse_args(['--data-dir', 'x']).batch_size == 128

    config.write_text('batch_sise: 16\n')
    with pytest.raises(SystemExit):
        train.parse_args(['-c', str(config), '--data-dir', 'x'])


def test_train_two_epochs(digits_subset, tmp_path):
    output = tmp_path / 'run'
    result = train.main(_train_args(digits_subset, output, 2))

    rows = _summary(output)
    assert [int(r['epoch']) for r in rows] == [0, 1]
    # cosine over 2 epochs, stepped per epoch: the full lr, then half of it
    assert [float(r['lr']) for r in rows] == pytest.approx([3e-3, 1.5e-3])
    assert float(rows[1]['train_loss']) < float(rows[0]['train_loss'])
    assert float(rows[1]['eval_loss']) < float(rows[0]['eval_loss'])
    assert result['epochs_run'] == 2 and result['output'] == str(output)
    assert result['final_top1'] == pytest.approx(float(rows[1]['eval_top1']))
    assert result['best_top1'] == max(float(r['eval_top1']) for r in rows)
    assert result['final_top1'] > 20  # 10 classes: chance is 10%
    for name in ('last.pth.tar', 'model_best.pth.tar', 'curves.png'):
        assert (output / name).stat().st_size > 0
    assert not list(output.glob('*.tmp'))

    checkpoint = torch.load(output / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert {'epoch', 'arch', 'state_dict', 'optimizer', 'scheduler', 'args', 'metric'} <= set(checkpoint)
    assert checkpoint['epoch'] == 1 and checkpoint['arch'] == 'test_convnext'
    assert checkpoint['metric'] == pytest.approx(result['final_top1'])


def test_schedule_steps_per_update(digits_subset, tmp_path):
    output = tmp_path / 'run'
    train.main(_train_args(digits_subset, output, 2, '--sched-on-updates', '--warmup-epochs', '1',
                           '--warmup-lr', '0'))
    updates_per_epoch, lr = 300 // 32, 3e-3
    total = 2 * updates_per_epoch
    # update n trains with the lr the schedule gives at t = n: linear warmup over epoch 0, then cosine
    expected = [lr * n / updates_per_epoch if n < updates_per_epoch else 0.5 * lr * (1 + math.cos(math.pi * n / total))
                for n in range(total)]
    epoch_means = [sum(expected[:updates_per_epoch]) / updates_per_epoch,
                   sum(expected[updates_per_epoch:]) / updates_per_epoch]
    assert [float(r['lr']) for r in _summary(output)] == pytest.approx(epoch_means)


def test_resume(digits_subset, tmp_path):
    output = tmp_path / 'run'
    first = train.main(_train_args(digits_subset, output, 1))
    assert first['epochs_run'] == 1
    updates_per_epoch = 300 // 32  # the train loader drops the last partial batch

    resumed = train.main(_train_args(digits_subset, output, 2, '--resume', str(output / 'last.pth.tar')))
    assert resumed['start_epoch'] == 1 and resumed['epochs_run'] == 1

    rows = _summary(output)
    assert [int(r['epoch']) for r in rows] == [0, 1]
    # the 2-epoch schedule is picked up at its second epoch
    assert float(rows[1]['lr']) == pytest.approx(1.5e-3)
    checkpoint = torch.load(output / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert checkpoint['epoch'] == 1
    # the optimizer state came back: Adam's step count runs on from the first run's
    steps = {int(state['step']) for state in checkpoint['optimizer']['state'].values()}
    assert steps == {2 * updates_per_epoch}


def test_model_table():
    if 'test_nat' not in timm.list_models('test_nat'):
        pytest.skip('test_nat is not registered yet (visionmix/models/nat.py)')
    assert 'test_nat' in visionmix_model_names()
    assert 'test_convnext' not in visionmix_model_names()

    rows = model_table(['test_nat'])
    assert len(rows) == 1 and rows[0]['name'] == 'test_nat'
    assert rows[0]['params'] > 0 and rows[0]['gflops'] > 0
    num_params = sum(p.numel() for p in timm.create_model('test_nat').parameters())
    assert rows[0]['params'] == pytest.approx(num_params / 1e6)
    # a larger input costs more
    assert model_table(['test_nat'], input_size=(3, 224, 224))[0]['gflops'] > rows[0]['gflops']
    assert '| test_nat |' in format_table(rows)


@pytest.mark.skipif(not os.path.exists(REPO_ROOT / 'configs' / 'demo' / 'digits_nat.yaml'), reason='no demo config')
def test_demo_config_parses():
    args = train.parse_args(['-c', str(REPO_ROOT / 'configs' / 'demo' / 'digits_nat.yaml'), '--data-dir', 'x'])
    assert args.model == 'test_nat' and args.img_size >= 96
