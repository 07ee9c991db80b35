import math

import pytest
import torch

from visionmix.data.sprites import (
    BAR_COLOR,
    CUE_COLORS,
    SPRITE_COLORS,
    SpriteRecallConfig,
    SpriteRecallDataset,
    _fold,
    sprite_recall_events,
    sprite_recall_tracks,
    sprite_recall_video,
)

CFG = SpriteRecallConfig()
T = 60


def _rgb(video):
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] in [0, 1]."""
    return video.permute(1, 2, 3, 0) * 0.5 + 0.5


def _mode_colors(video):
    """The most frequent colour of each frame, i.e. its background."""
    modes = []
    for frame in _rgb(video):
        colors, counts = frame.reshape(-1, 3).unique(dim=0, return_counts=True)
        modes.append(colors[counts.argmax()])
    return torch.stack(modes)


def _close(a, b, atol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=atol)


def test_deterministic_per_seed():
    assert torch.equal(sprite_recall_video(T, 7), sprite_recall_video(T, 7))
    assert not torch.equal(sprite_recall_video(T, 7), sprite_recall_video(T, 8))


def test_shorter_clip_is_prefix():
    assert torch.equal(sprite_recall_video(10, 5), sprite_recall_video(T, 5)[:, :10])


def test_shape_dtype_range():
    cfg = SpriteRecallConfig(size=16)
    video = sprite_recall_video(T, 0, cfg)
    assert video.shape == (3, T, 16, 16)
    assert video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert sprite_recall_video(1, 0).shape == (3, 1, 24, 24)


def test_events_and_properties():
    assert list(CFG.cue_frames) == [3, 4, 5]
    assert list(CFG.blackout_frames) == list(range(6, 18))
    assert CFG.recall_start == 18
    assert sprite_recall_events(CFG, T) == dict(
        sink=range(0, 3), cue=range(3, 6), blackout=range(6, 18), recall=range(18, T))
    assert sprite_recall_events(CFG, 8) == dict(
        sink=range(0, 3), cue=range(3, 6), blackout=range(6, 8), recall=range(8, 8))
    assert sprite_recall_events(None, 2)['cue'] == range(2, 2)


@pytest.mark.parametrize('seed', range(6))
def test_background_phases(seed):
    video = sprite_recall_video(T, seed)
    modes = _mode_colors(video)
    events = sprite_recall_events(CFG, T)
    cue = modes[events['cue'].start]
    assert any(_close(cue, c) for c in CUE_COLORS)
    for t in range(T):
        if t in events['sink']:
            expected = (CFG.neutral_grey,) * 3
        elif t in events['blackout']:
            expected = (CFG.blackout_grey,) * 3
        else:
            expected = cue
        assert _close(modes[t], expected), t


def test_cue_colour_varies_with_seed():
    cues = {tuple(_mode_colors(sprite_recall_video(4, seed))[3].tolist()) for seed in range(30)}
    assert len(cues) >= 4


def test_countdown_bar():
    video = _rgb(sprite_recall_video(T, 3))
    is_bar = (video[:, 0] == torch.tensor(BAR_COLOR)).all(-1)  # [T, W]; sprites never reach row 0
    lengths = is_bar.sum(-1)
    blackout = CFG.blackout_frames
    for t in range(T):
        if t in blackout:
            expected = math.ceil(CFG.size * (blackout.stop - t) / len(blackout))
            assert lengths[t] == expected and is_bar[t, :expected].all(), t
        else:
            assert lengths[t] == 0, t
    assert lengths[blackout.start] == CFG.size
    assert (lengths[blackout.start + 1:blackout.stop] < lengths[blackout.start:blackout.stop - 1]).all()


def _sprite_boxes(video):
    """Top-left corner of the non-background region of each frame (one sprite), and its pixel count."""
    frames = _rgb(video)
    modes = _mode_colors(video)
    fg = (frames != modes[:, None, None]).any(-1)
    fg[:, 0] = False  # countdown bar row
    corners, counts = [], []
    for mask in fg:
        ys, xs = mask.nonzero(as_tuple=True)
        corners.append((xs.min().item(), ys.min().item()))
        counts.append(mask.sum().item())
    return torch.tensor(corners), torch.tensor(counts)


def test_single_sprite_inside_frame_and_moving():
    cfg = SpriteRecallConfig(num_sprites=1)
    video = sprite_recall_video(200, 11, cfg)
    corners, counts = _sprite_boxes(video)
    assert (counts == cfg.sprite_size ** 2).all()  # fully visible in every frame, blackout included
    hi = cfg.size - cfg.sprite_size
    assert corners[:, 0].min() >= 0 and corners[:, 0].max() <= hi
    assert corners[:, 1].min() >= 1 and corners[:, 1].max() <= hi
    assert ((corners[2:] - corners[:-2]).abs().sum(-1) > 0).all()
    xy, _ = sprite_recall_tracks(200, 11, cfg)
    assert torch.equal(corners, torch.round(xy[0]).long())
    # the sprite bounces: each coordinate changes direction at least once
    for d in range(2):
        steps = torch.sign(xy[0, 1:, d] - xy[0, :-1, d])
        assert (steps > 0).any() and (steps < 0).any()


def test_fold_matches_stepwise_reflection():
    g = torch.Generator().manual_seed(0)
    lo, hi = 1., 20.
    pos = lo + torch.rand(64, generator=g, dtype=torch.float64) * (hi - lo)
    vel = (torch.rand(64, generator=g, dtype=torch.float64) - 0.5) * 8
    start, t = pos.clone(), torch.arange(300, dtype=torch.float64)
    folded = _fold(start[:, None] + vel[:, None] * t, lo, hi)
    for step in range(1, 300):
        pos = pos + vel
        bounced = (pos > hi) | (pos < lo)
        pos = torch.where(pos > hi, 2 * hi - pos, torch.where(pos < lo, 2 * lo - pos, pos))
        vel = torch.where(bounced, -vel, vel)
        assert torch.allclose(folded[:, step], pos, atol=1e-6), step
    assert _fold(torch.tensor([3., -2.]), 1., 1.).eq(1.).all()


def test_sprites_drawn_in_order():
    cfg = SpriteRecallConfig(num_sprites=3)
    video = _rgb(sprite_recall_video(T, 2, cfg))
    xy, colors = sprite_recall_tracks(T, 2, cfg)
    pos = torch.round(xy).long()
    s = cfg.sprite_size
    for t in range(T):
        covered = torch.zeros(cfg.size, cfg.size, dtype=torch.bool)
        for i in reversed(range(cfg.num_sprites)):
            x, y = pos[i, t].tolist()
            box = torch.zeros_like(covered)
            box[y:y + s, x:x + s] = True
            visible = box & ~covered
            assert (video[t][visible] == colors[i]).all(), (t, i)
            covered |= box


def test_palettes():
    cue = torch.tensor(CUE_COLORS)
    sprite = torch.tensor(SPRITE_COLORS)
    greys = torch.tensor([[CFG.neutral_grey] * 3, [CFG.blackout_grey] * 3])
    assert len(CUE_COLORS) == 6 and len(SPRITE_COLORS) == 4
    assert ((cue >= 0) & (cue <= 1)).all() and ((sprite >= 0) & (sprite <= 1)).all()
    assert torch.pdist(cue).min() > 0.5
    assert (cue.max(1).values - cue.min(1).values).min() > 0.5  # saturated, not grey
    assert torch.cdist(cue, greys).min() > 0.5
    assert torch.pdist(sprite).min() > 0.3
    assert torch.cdist(sprite, torch.cat([cue, greys])).min() > 0.4


@pytest.mark.parametrize('field, value', [
    ('size', 7),
    ('frames_per_chunk', 0),
    ('sink_chunks', 0),
    ('cue_chunks', 0),
    ('blackout_chunks', 0),
    ('num_sprites', 0),
    ('sprite_size', 0),
    ('sprite_size', 24),
    ('max_speed', 0.),
    ('cue_colors', ()),
])
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=field):
        SpriteRecallConfig(**{field: value})


def test_bad_args():
    with pytest.raises(ValueError, match='num_frames'):
        sprite_recall_video(0, 0)
    with pytest.raises(ValueError, match='num_frames'):
        SpriteRecallDataset(0, 4)
    with pytest.raises(ValueError, match='length'):
        SpriteRecallDataset(8, 0)


def test_dataset():
    cfg = SpriteRecallConfig(size=16)
    ds = SpriteRecallDataset(12, 5, seed=3, config=cfg)
    assert len(ds) == 5
    assert torch.equal(ds[2], sprite_recall_video(12, 3 * 1_000_003 + 2, cfg))
    assert torch.equal(ds[2], SpriteRecallDataset(12, 5, seed=3, config=cfg)[2])
    assert torch.equal(ds[-1], ds[4])
    assert not torch.equal(ds[0], ds[1])
    assert not torch.equal(ds[0], SpriteRecallDataset(12, 5, seed=4, config=cfg)[0])
    with pytest.raises(IndexError):
        ds[5]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch.shape == (5, 3, 12, 16, 16)
