"""tools/validate.py on the digits export, against a tools/train.py run, on CPU."""
import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from visionmix.data import export_digits

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(f'visionmix_tools_{name}', REPO_ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train, validate = _load('train'), _load('validate')


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
    """A 1-epoch train.py run with EMA on a digits subset (30 train / 10 validation images per class)."""
    digits = tmp_path_factory.mktemp('digits')
    export_digits(str(digits))
    subset = tmp_path_factory.mktemp('digits_subset')
    for split, per_class in (('train', 30), ('validation', 10)):
        for label_dir in sorted((digits / split).iterdir()):
            (subset / split / label_dir.name).mkdir(parents=True)
            for png in sorted(label_dir.glob('*.png'))[:per_class]:
                shutil.copy(png, subset / split / label_dir.name / png.name)
    output = tmp_path_factory.mktemp('run')
    train.main([
        '--data-dir', str(subset), '--output', str(output), '--model', 'test_convnext', '--img-size', '32',
        '--crop-pct', '1', '--epochs', '1', '-b', '32', '--lr', '3e-3', '--no-aug', '--smoothing', '0',
        '--workers', '0', '--device', 'cpu', '--seed', '0', '--no-progress', '--model-ema',
        '--model-ema-decay', '0.5'])
    with open(output / 'summary.csv', newline='') as f:
        row = list(csv.DictReader(f))[-1]
    return subset, output, row


def test_validate_reproduces_train_eval(trained_run, tmp_path):
    data_dir, output, row = trained_run
    results_file = tmp_path / 'results' / 'val.json'
    common = ['--data-dir', str(data_dir), '-b', '17', '-j', '0', '--device', 'cpu', '--no-progress']
    results = validate.main(common + ['--checkpoint', str(output / 'last.pth.tar'),
                                      '--results-file', str(results_file)])
    assert results['model'] == 'test_convnext' and results['num_images'] == 100
    assert results['input_size'] == [3, 32, 32] and results['crop_pct'] == 1
    assert results['top1'] == pytest.approx(float(row['eval_top1']), abs=1e-6)
    assert results['top5'] == pytest.approx(float(row['eval_top5']), abs=1e-6)
    assert results['loss'] == pytest.approx(float(row['eval_loss']), abs=1e-5)
    assert json.loads(results_file.read_text())['top1'] == results['top1']

    ema = validate.main(common + ['--checkpoint', str(output / 'last.pth.tar'), '--use-ema'])
    assert ema['top1'] == pytest.approx(float(row['ema_eval_top1']), abs=1e-6)
    assert ema['loss'] == pytest.approx(float(row['ema_eval_loss']), abs=1e-5)

    # a plain state dict through timm's load_checkpoint, preprocessing given on the command line
    state_dict = torch.load(output / 'last.pth.tar', map_location='cpu', weights_only=True)['state_dict']
    torch.save(state_dict, tmp_path / 'plain.pth')
    plain = validate.main(common + ['--model', 'test_convnext', '--num-classes', '10', '--checkpoint',
                                    str(tmp_path / 'plain.pth'), '--img-size', '32', '--crop-pct', '1'])
    assert plain['top1'] == pytest.approx(results['top1'], abs=1e-6)


def test_validate_arguments(tmp_path):
    with pytest.raises(SystemExit):
        validate.parse_args(['--data-dir', 'x', '--pretrained', '--checkpoint', 'y'])
    args = validate.parse_args(['--data-dir', 'x', '--model', 'nat_mini', '--interpolation', 'bicubic'])
    assert args.batch_size == 256 and args.interpolation == 'bicubic' and not args.use_ema
