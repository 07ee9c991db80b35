"""tools/train_stream.py and tools/stream_demo.py end to end on a tiny model, and the shipped checkpoint."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from visionmix.adapters.streaming import StreamingGenerator
from visionmix.adapters.streaming.recipes import SETTINGS, load_stream_model, setting
from visionmix.data.sprites import SpriteRecallConfig, sprite_recall_video

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / 'assets' / 'stream_sprites.pt'


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f'visionmix_{name}', REPO / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp('stream') / 'tiny.pt'
    load_tool('train_stream').main(['--out', str(out), '--steps-a', '2', '--steps-b', '4', '--batch-size', '2',
                                    '--clip-chunks', '5', '--embed-dim', '12', '--depth', '1', '--num-heads', '2',
                                    '--rollout-prob', '1', '--warmup-steps', '1', '--seed', '3'])
    return out


def test_train_stream_runs_both_phases(tiny_checkpoint):
    model, ckpt = load_stream_model(tiny_checkpoint)
    hist = ckpt['history']
    assert hist['phase'] == ['A'] * 2 + ['B'] * 4
    assert set(hist['setting'][:2]) <= {'window', 'dense'}
    assert set(hist['setting'][2:]) <= {'dense', 'window+memory', 'window+memory+sparse'}
    assert all(torch.isfinite(torch.tensor(hist['loss'])))
    assert tiny_checkpoint.with_suffix('.png').exists()
    # phase B trained the memory readout (zero-initialised, so any change means it received gradient)
    if any('memory' in s for s in hist['setting'][2:]):
        assert any(b.attn.memory_proj.weight.abs().sum() > 0 for b in model.blocks)


def test_train_stream_continues_from_a_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / 'more.pt'
    load_tool('train_stream').main(['--init', str(tiny_checkpoint), '--out', str(out), '--steps-a', '0',
                                    '--steps-b', '1', '--batch-size', '1', '--clip-chunks', '5',
                                    '--rollout-prob', '0', '--warmup-steps', '1', '--embed-dim', '32'])
    before, first = load_stream_model(tiny_checkpoint)
    after, ckpt = load_stream_model(out)
    assert ckpt['model_args'] == first['model_args'] and ckpt['model_args']['embed_dim'] == 12  # kept, not --embed-dim
    assert ckpt['history']['earlier']['loss'] == first['history']['loss'] and ckpt['history']['phase'] == ['B']
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


def test_train_stream_needs_clips_longer_than_the_window(tmp_path):
    with pytest.raises(SystemExit, match='clip-chunks'):
        load_tool('train_stream').main(['--out', str(tmp_path / 'x.pt'), '--clip-chunks', '4'])


def test_stream_demo_writes_video_plots_and_summary(tiny_checkpoint, tmp_path):
    load_tool('stream_demo').main(['--checkpoint', str(tiny_checkpoint), '--frames', '27', '--clips', '2',
                                   '--out', str(tmp_path)])
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert list(summary['settings']) == list(SETTINGS)
    for name, r in summary['settings'].items():
        assert len(r['latency_s']) == len(r['memory_bytes']) == 9 and len(r['psnr']) == 27
        if name == 'dense':
            assert r['memory_bytes'][-1] > r['memory_bytes'][3]  # the full history grows
        else:
            assert len(set(r['memory_bytes'][3:])) == 1  # flat once the window is full
    assert min(summary['settings']['window']['psnr'][:6]) > 60  # primed frames are the ground truth
    for name in ('stream.gif', 'stream_demo.png', 'summary.md'):
        assert (tmp_path / name).stat().st_size > 0


def test_stream_demo_writes_mp4_with_pyav(tmp_path):
    pytest.importorskip('av')
    video = torch.rand(3, 4, 8, 8) * 2 - 1
    load_tool('stream_demo').write_video(video, {'window': video}, tmp_path)
    assert (tmp_path / 'stream.gif').stat().st_size > 0 and (tmp_path / 'stream.mp4').stat().st_size > 0


def test_shipped_checkpoint_remembers_the_cue_across_the_blackout():
    """The committed model: the linear memory recovers the cue colour that window-only attention has lost."""
    assert CHECKPOINT.stat().st_size < 8 * 2 ** 20
    model, ckpt = load_stream_model(CHECKPOINT)
    data = SpriteRecallConfig(**ckpt['data'])
    f, n = model.frames_per_chunk, data.recall_start // model.frames_per_chunk + 2
    truth = torch.stack([sprite_recall_video(n * f, 9_000_000 + i, data) for i in range(6)])
    recall = slice(data.recall_start, n * f)
    errors = {}
    for name in ('window', 'window+memory'):
        layout, config = setting(name, model, ckpt['stream'], n)
        state = model.new_state(layout, config, truth.shape[0])
        gen = StreamingGenerator(model.forward_chunk, state, (truth.shape[0], 3, f, data.size, data.size))
        chunks = gen.generate(n, prime=truth[:, :, :2 * f], generator=torch.Generator().manual_seed(0))
        video = torch.cat(list(chunks), 2)
        errors[name] = (video[:, :, recall] - truth[:, :, recall]).square().mean().item()
    assert errors['window+memory'] < 0.5 * errors['window'], errors
