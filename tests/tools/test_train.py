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


def test_ema_and_augmentation(digits_subset, tmp_path):
    output = tmp_path / 'run'
    args = [a for a in _train_args(digits_subset, output, 1) if a != '--no-aug']
    result = train.main(args + [
        '--model-ema', '--model-ema-decay', '0.9', '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25',
        '--remode', 'pixel', '--recount', '2', '--interpolation', 'bicubic', '--mixup', '0.8', '--cutmix', '1.0',
        '--mixup-prob', '0.9', '--mixup-switch-prob', '0.5', '--mixup-mode', 'elem', '--smoothing', '0.1',
        '--aug-repeats', '3', '--drop-path', '0.1'])
    rows = _summary(output)
    assert list(rows[0]) == list(train.SUMMARY_FIELDS + train.EMA_SUMMARY_FIELDS)
    assert 0 <= float(rows[0]['ema_eval_top1']) <= 100
    assert result['final_ema_top1'] == pytest.approx(float(rows[0]['ema_eval_top1']))
    checkpoint = torch.load(output / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert checkpoint['args']['aa'] == 'rand-m9-mstd0.5-inc1'
    assert set(checkpoint['state_dict_ema']) == set(checkpoint['state_dict'])
    assert not torch.equal(checkpoint['state_dict_ema']['head.fc.weight'], checkpoint['state_dict']['head.fc.weight'])


def test_amp_float16_compile_resume(digits_subset, tmp_path):
    output = tmp_path / 'run'
    flags = ['--amp', '--amp-dtype', 'float16', '--torch-compile', '--torch-compile-backend', 'eager',
             '--channels-last', '--grad-checkpointing', '--clip-grad', '1.0', '--model-ema']
    train.main(_train_args(digits_subset, output, 1, *flags))
    checkpoint = torch.load(output / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert checkpoint['scaler']['scale'] > 0
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in checkpoint['state_dict'])
    resumed = train.main(_train_args(digits_subset, output, 2, *flags, '--resume', str(output / 'last.pth.tar')))
    assert resumed['start_epoch'] == 1 and math.isfinite(resumed['final_eval_loss'])
    assert [int(r['epoch']) for r in _summary(output)] == [0, 1]


def test_resume_mid_epoch_matches_uninterrupted(digits_subset, tmp_path):
    # 9 updates per epoch; drop path and the EMA make the restored RNG and EMA states count
    flags = ['--checkpoint-interval', '4', '--drop-path', '0.2', '--model-ema', '--model-ema-decay', '0.8']
    full = tmp_path / 'full'
    train.main(_train_args(digits_subset, full, 2, *flags))

    killed = tmp_path / 'killed'
    with pytest.raises(SystemExit, match='update 14'):
        train.main(_train_args(digits_subset, killed, 2, *flags, '--stop-after-updates', '14'))
    checkpoint = torch.load(killed / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert (checkpoint['epoch'], checkpoint['batch_idx']) == (1, 3)  # update 12 = epoch 1, 3 batches in
    resumed = train.main(_train_args(digits_subset, killed, 2, *flags, '--resume', str(killed / 'last.pth.tar')))
    assert (resumed['start_epoch'], resumed['start_batch']) == (1, 3)

    a = torch.load(full / 'last.pth.tar', map_location='cpu', weights_only=True)
    b = torch.load(killed / 'last.pth.tar', map_location='cpu', weights_only=True)
    for key in ('state_dict', 'state_dict_ema'):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=1e-6, msg=f'{key} {name}')
    steps = {int(state['step']) for state in b['optimizer']['state'].values()}
    assert steps == {18}
    rows_a, rows_b = _summary(full), _summary(killed)
    assert len(rows_b) == 2
    for row_a, row_b in zip(rows_a, rows_b):
        for field in ('train_loss', 'eval_top1', 'ema_eval_top1', 'lr'):
            assert float(row_b[field]) == pytest.approx(float(row_a[field]), abs=1e-6)


def test_distributed_torchrun(digits_subset, tmp_path):
    import subprocess
    import sys
    output = tmp_path / 'run'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    # 4 batches per rank in groups of 2 (DDP's no_sync on the first of each), a mid-epoch save after update 1
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(REPO_ROOT / 'tools' / 'train.py'), *_train_args(digits_subset, output, 1, '--checkpoint-interval', '1',
                                                              '--model-ema', '--grad-accum-steps', '2')]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'batch 32 x 2 ranks x 2 accumulation steps = 128 images per update, 2 updates/epoch' in proc.stdout
    lines = (output / 'summary.csv').read_text().splitlines()
    assert len(lines) == 2 and lines[0].split(',')[:5] == ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5']
    assert 'ema_eval_top1' in lines[0]
    assert proc.stdout.count('epoch   1/1') == 1  # only rank 0 prints
    checkpoint = torch.load(output / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert checkpoint['args']['world_size'] == 2
    assert not any(k.startswith('module.') for k in checkpoint['state_dict'])


def test_imagenet_configs():
    configs = sorted((REPO_ROOT / 'configs' / 'imagenet').glob('*.yaml'))
    families = ('nat_', 'dinat_', 'biformer_', 'mavit_', 'ravlt_', 'inline_', 'l2vit_', 'vcmamba_')
    released = {n for n in visionmix_model_names() if n.startswith(families)}
    assert released, 'no released models registered'
    assert {p.stem for p in configs} >= released
    registered = set(timm.list_models())
    for path in configs:
        text = path.read_text()
        assert 'Source:' in text.splitlines()[0], path.name
        args = train.parse_args(['-c', str(path), '--data-dir', 'x'])
        assert args.model == path.stem and args.model in registered
        assert args.epochs > 0 and args.lr > 0 and args.batch_size > 0 and args.img_size in (224, 384)
