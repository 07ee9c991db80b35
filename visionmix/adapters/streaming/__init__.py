"""Streaming chunk-causal video generation with Hybrid Forcing attention.

Hybrid Forcing (https://arxiv.org/abs/2604.10103): sliding-window attention over a sink and recent chunks from a
preallocated rolling cache of pre-RoPE keys, a linear-attention memory that absorbs evicted chunks exactly once,
and top-k block-sparse attention inside the window. Nothing grows with the number of frames.

- ``StreamLayout``: sink / window / chunk geometry, eviction schedule and relative RoPE positions.
- ``HybridConfig``: memory on/off and mode, feature map, sparsity.
- ``StreamState``: the per-layer caches and memories; ``StreamingGenerator``: the few-step chunk loop.
- ``StreamingVideoDiT``: a small Wan-shaped model with both a streaming and a whole-clip (training) path.
- ``visionmix.adapters.diffusers_wan_streaming`` streams diffusers' ``WanTransformer3DModel`` (imported on use).
"""
from .dit import StreamingVideoDiT
from .engine import StreamingGenerator, shifted_sigmas
from .layout import StreamLayout
from .memory import LinearMemory, memory_readout_chunked
from .rope import VideoRope
from .state import HybridConfig, LayerCache, StreamState
from .window_attention import select_key_blocks, window_attention

__all__ = ['HybridConfig', 'LayerCache', 'LinearMemory', 'StreamLayout', 'StreamState', 'StreamingGenerator',
           'StreamingVideoDiT', 'VideoRope', 'memory_readout_chunked', 'select_key_blocks', 'shifted_sigmas',
           'window_attention']
