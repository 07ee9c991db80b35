"""Small real datasets exported to timm's ImageFolder layout, and procedural video datasets."""
from .digits import export_digits
from .sprites import (
    SpriteRecallConfig,
    SpriteRecallDataset,
    sprite_recall_events,
    sprite_recall_tracks,
    sprite_recall_video,
)

__all__ = [
    'export_digits', 'SpriteRecallConfig', 'SpriteRecallDataset', 'sprite_recall_events', 'sprite_recall_tracks',
    'sprite_recall_video',
]
