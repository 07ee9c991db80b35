"""Procedural moving-sprite videos with a colour recall event, for streaming video generation.

Each clip has a neutral-grey sink intro, a cue phase whose background shows one of a few saturated colours, a dark
blackout with a countdown bar, then the cue colour again for every later frame. Sprites bounce around throughout.
A streaming model that only sees the sink chunk plus a short window of recent chunks must carry the cue colour across
the blackout to render the recall frames.
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch.utils.data import Dataset

Color = Tuple[float, float, float]

CUE_COLORS: Tuple[Color, ...] = (
    (0.9, 0.1, 0.1),  # red
    (0.1, 0.75, 0.1),  # green
    (0.1, 0.2, 0.9),  # blue
    (0.9, 0.85, 0.1),  # yellow
    (0.85, 0.1, 0.85),  # magenta
    (0.1, 0.85, 0.85),  # cyan
)
SPRITE_COLORS: Tuple[Color, ...] = (
    (1.0, 1.0, 1.0),  # white
    (1.0, 0.6, 0.8),  # pink
    (0.7, 0.7, 1.0),  # lavender
    (0.6, 1.0, 0.7),  # mint
)
BAR_COLOR: Color = (1.0, 1.0, 1.0)
MIN_SPEED = 0.5


@dataclass
class SpriteRecallConfig:
    """Layout of a sprite recall clip; phase lengths are in chunks of ``frames_per_chunk`` frames."""
    size: int = 24
    frames_per_chunk: int = 3
    sink_chunks: int = 1
    cue_chunks: int = 1
    blackout_chunks: int = 4
    num_sprites: int = 2
    sprite_size: int = 4
    max_speed: float = 1.5
    neutral_grey: float = 0.5
    blackout_grey: float = 0.1
    cue_colors: Tuple[Color, ...] = CUE_COLORS
    sprite_colors: Tuple[Color, ...] = SPRITE_COLORS
    bar_color: Color = BAR_COLOR

    def __post_init__(self):
        if self.size < 8:
            raise ValueError(f'size must be >= 8, got {self.size}')
        for name in ('frames_per_chunk', 'sink_chunks', 'cue_chunks', 'blackout_chunks', 'num_sprites', 'sprite_size'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
        if self.sprite_size >= self.size:
            raise ValueError(f'sprite_size must be < size ({self.size}), got {self.sprite_size}')
        if not self.max_speed > 0:
            raise ValueError(f'max_speed must be > 0, got {self.max_speed}')
        for name in ('cue_colors', 'sprite_colors'):
            if len(getattr(self, name)) == 0:
                raise ValueError(f'{name} must not be empty')

    @property
    def sink_frames(self) -> range:
        return range(0, self.sink_chunks * self.frames_per_chunk)

    @property
    def cue_frames(self) -> range:
        start = self.sink_frames.stop
        return range(start, start + self.cue_chunks * self.frames_per_chunk)

    @property
    def blackout_frames(self) -> range:
        start = self.cue_frames.stop
        return range(start, start + self.blackout_chunks * self.frames_per_chunk)

    @property
    def recall_start(self) -> int:
        """First frame after the blackout; this and all later frames show the cue colour."""
        return self.blackout_frames.stop


def sprite_recall_events(config: Optional[SpriteRecallConfig], num_frames: int) -> Dict[str, range]:
    """Frame ranges of the 'sink', 'cue', 'blackout' and 'recall' phases, clipped to ``num_frames``."""
    config = config or SpriteRecallConfig()
    _check_num_frames(num_frames)
    n = num_frames
    clip = lambda r: range(min(r.start, n), min(r.stop, n))
    return dict(
        sink=clip(config.sink_frames),
        cue=clip(config.cue_frames),
        blackout=clip(config.blackout_frames),
        recall=range(min(config.recall_start, n), n),
    )


def _fold(p: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Position after reflecting off walls at ``lo`` and ``hi`` (a triangle wave), equal to step-wise mirroring."""
    span = hi - lo
    if span <= 0:
        return torch.full_like(p, lo)
    u = torch.remainder(p - lo, 2 * span)
    return lo + span - (u - span).abs()


def _draw(num_frames: int, seed: int, config: SpriteRecallConfig):
    """All random draws of a clip; their number does not depend on ``num_frames`` so shorter clips are prefixes."""
    g = torch.Generator().manual_seed(seed)
    n, hi = config.num_sprites, float(config.size - config.sprite_size)
    cue_idx = int(torch.randint(len(config.cue_colors), (1,), generator=g))
    start = torch.rand(n, 2, generator=g, dtype=torch.float64)
    start = torch.stack([start[:, 0] * hi, 1 + start[:, 1] * (hi - 1)], dim=1)
    lo_speed = min(MIN_SPEED, config.max_speed)
    speed = lo_speed + torch.rand(n, 2, generator=g, dtype=torch.float64) * (config.max_speed - lo_speed)
    sign = torch.randint(2, (n, 2), generator=g) * 2 - 1
    color_idx = torch.randint(len(config.sprite_colors), (n,), generator=g)

    t = torch.arange(num_frames, dtype=torch.float64)
    raw = start[:, None, :] + (speed * sign)[:, None, :] * t[None, :, None]
    xy = torch.stack([_fold(raw[..., 0], 0., hi), _fold(raw[..., 1], 1., hi)], dim=-1)
    sprite_colors = torch.tensor(config.sprite_colors, dtype=torch.float32)[color_idx]
    return cue_idx, xy, sprite_colors


def sprite_recall_tracks(
        num_frames: int,
        seed: int,
        config: Optional[SpriteRecallConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sprite positions and colours of the clip ``sprite_recall_video`` renders for the same arguments.

    Returns:
        ``xy`` float64 ``[num_sprites, num_frames, 2]``, unrounded top-left (x, y) per frame, and ``colors`` float32
        ``[num_sprites, 3]`` RGB in [0, 1].
    """
    config = config or SpriteRecallConfig()
    _check_num_frames(num_frames)
    _, xy, colors = _draw(num_frames, seed, config)
    return xy, colors


def sprite_recall_video(num_frames: int, seed: int, config: Optional[SpriteRecallConfig] = None) -> torch.Tensor:
    """Render a deterministic sprite recall clip as float32 ``[3, num_frames, size, size]`` in [-1, 1]."""
    config = config or SpriteRecallConfig()
    _check_num_frames(num_frames)
    cue_idx, xy, sprite_colors = _draw(num_frames, seed, config)
    size, s = config.size, config.sprite_size

    cue = torch.tensor(config.cue_colors[cue_idx])
    bg = torch.empty(num_frames, 3)
    bg[:] = cue
    events = sprite_recall_events(config, num_frames)
    bg[events['sink'].start:events['sink'].stop] = config.neutral_grey
    bg[events['blackout'].start:events['blackout'].stop] = config.blackout_grey
    video = bg.t()[:, :, None, None].repeat(1, 1, size, size)

    cols = torch.arange(size)
    blackout = config.blackout_frames
    for t in events['blackout']:
        length = math.ceil(size * (blackout.stop - t) / len(blackout))
        video[:, t, 0, :length] = torch.tensor(config.bar_color)[:, None]

    pos = torch.round(xy).long()
    for i in range(config.num_sprites):
        x, y = pos[i, :, 0], pos[i, :, 1]
        in_x = (cols >= x[:, None]) & (cols < x[:, None] + s)
        in_y = (cols >= y[:, None]) & (cols < y[:, None] + s)
        mask = in_y[:, :, None] & in_x[:, None, :]
        video = torch.where(mask[None], sprite_colors[i][:, None, None, None], video)
    return video * 2 - 1


class SpriteRecallDataset(Dataset):
    """``length`` sprite recall clips of ``num_frames`` frames; clip ``i`` uses seed ``seed * 1_000_003 + i``."""

    def __init__(self, num_frames: int, length: int, seed: int = 0, config: Optional[SpriteRecallConfig] = None):
        _check_num_frames(num_frames)
        if length < 1:
            raise ValueError(f'length must be >= 1, got {length}')
        self.num_frames = num_frames
        self.length = length
        self.seed = seed
        self.config = config or SpriteRecallConfig()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -self.length <= i < self.length:
            raise IndexError(f'index {i} out of range for {self.length} clips')
        i = i % self.length
        return sprite_recall_video(self.num_frames, self.seed * 1_000_003 + i, self.config)


def _check_num_frames(num_frames: int):
    if num_frames < 1:
        raise ValueError(f'num_frames must be >= 1, got {num_frames}')
