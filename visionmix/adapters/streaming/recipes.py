"""The four attention settings streaming is compared in, and saving/loading a trained streaming model."""
from typing import Dict, Optional, Tuple

import torch

from .dit import StreamingVideoDiT
from .layout import StreamLayout
from .state import HybridConfig

__all__ = ['SETTINGS', 'setting', 'save_stream_model', 'load_stream_model']

SETTINGS = ('dense', 'window', 'window+memory', 'window+memory+sparse')


def setting(name: str, model: StreamingVideoDiT, stream: Dict, max_chunks: int) -> Tuple[StreamLayout, HybridConfig]:
    """Layout and attention config of one of ``SETTINGS`` for ``model`` trained with ``stream`` options.

    ``dense`` keeps the whole history (cache sized for ``max_chunks``); ``window`` keeps sink + window only;
    ``window+memory`` adds the linear memory; ``window+memory+sparse`` also runs top-k block-sparse attention.
    """
    if name not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {name!r}")
    f, tpf = model.frames_per_chunk, model.tokens_per_frame
    if name == 'dense':
        return StreamLayout(f, tpf, stream['sink_chunks'], None, max_chunks=max_chunks), HybridConfig(memory=False)
    layout = StreamLayout(f, tpf, stream['sink_chunks'], stream['window_chunks'],
                          rope_frame_cap=stream['rope_frame_cap'])
    sparse = stream['sparsity_ratio'] if name.endswith('sparse') else None
    config = HybridConfig(memory='memory' in name, feature_map=stream['feature_map'], sparsity_ratio=sparse,
                          block_size=stream['block_size'])
    return layout, config


def save_stream_model(path, model: StreamingVideoDiT, model_args: Dict, stream: Dict, data: Dict,
                      history: Optional[Dict] = None) -> None:
    """Weights plus everything needed to rebuild and stream the model."""
    torch.save(dict(model=model.state_dict(), model_args=model_args, stream=stream, data=data,
                    history=history or {}), path)


def load_stream_model(path, device=None) -> Tuple[StreamingVideoDiT, Dict]:
    """``(model in eval mode, checkpoint dict)``; weights are loaded strictly."""
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    model = StreamingVideoDiT(**ckpt['model_args'])
    model.load_state_dict(ckpt['model'])
    return model.to(device).eval(), ckpt

