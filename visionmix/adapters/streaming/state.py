"""Preallocated streaming state: one rolling KV cache (+ linear memory) per attention layer, one shared clock."""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .layout import StreamLayout
from .memory import LinearMemory, feature_map
from .rope import VideoRope
from .window_attention import window_attention

__all__ = ['HybridConfig', 'StreamState', 'LayerCache']

MEMORY_MODES = ('visionmix', 'hybrid_forcing')


@dataclass(frozen=True)
class HybridConfig:
    """How a streaming step attends.

    Args:
        memory: absorb evicted chunks into a linear memory and add its readout.
        memory_mode: ``'visionmix'`` reads and writes with the same feature map ``phi`` (as in training) and keeps
            the sink out of the memory (it never leaves the window). ``'hybrid_forcing'`` reproduces the released
            Hybrid Forcing inference schedule: the sink chunk is also absorbed (with its keys rotated twice, as
            the original caches them rotated), ``M`` holds rotated raw keys ``R(k) v^T`` rotated at the evicted
            chunk's relative position, and queries read ``R(q)^T M / (phi(q)^T z + eps)``.
        feature_map: ``'relu'`` (the original's) or ``'elu1'``.
        sparsity_ratio: share of key blocks kept by the top-k window attention; None is dense attention.
        block_size: token block size of the sparse selection.
    """
    memory: bool = True
    memory_mode: str = 'visionmix'
    feature_map: str = 'relu'
    eps: float = 1e-6
    sparsity_ratio: Optional[float] = None
    block_size: int = 64
    backend: str = 'auto'

    def __post_init__(self):
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {self.memory_mode!r}")
        feature_map(self.feature_map)
        if self.sparsity_ratio is not None and not 0.0 < self.sparsity_ratio <= 1.0:
            raise ValueError(f"sparsity_ratio must be None (dense) or lie in (0, 1], got {self.sparsity_ratio}")


class StreamState:
    """The stream's clock (current chunk index) and the per-layer caches, all allocated up front."""

    def __init__(self, layout: StreamLayout, config: HybridConfig, frame_hw: Tuple[int, int], rope: VideoRope):
        if frame_hw[0] * frame_hw[1] != layout.tokens_per_frame:
            raise ValueError(f"frame_hw {tuple(frame_hw)} holds {frame_hw[0] * frame_hw[1]} tokens, layout says "
                             f"tokens_per_frame={layout.tokens_per_frame}")
        self.layout, self.config, self.frame_hw, self.rope = layout, config, tuple(frame_hw), rope
        self.chunk = 0
        self.layers: List['LayerCache'] = []
        self._view = (-1, 0, ())

    def view(self) -> Tuple[int, Tuple[int, ...]]:
        """``(chunks the current step attends to, itself included; their RoPE frame positions)``, once per chunk."""
        if self._view[0] != self.chunk:
            positions = tuple(self.layout.frame_positions(self.chunk))
            self._view = (self.chunk, len(self.layout.history(self.chunk)) + 1, positions)
        return self._view[1:]

    def add_layer(self, batch: int, heads: int, head_dim: int, value_dim: Optional[int] = None, dtype=None,
                  device=None) -> 'LayerCache':
        layer = LayerCache(self, batch, heads, head_dim, value_dim or head_dim, dtype or torch.float32, device)
        self.layers.append(layer)
        return layer

    def commit(self) -> None:
        """Keep the current chunk (the slots written by the last call, the clean pass) and move to the next."""
        evicted = self.layout.evicted(self.chunk) is not None
        for layer in self.layers:
            layer.commit(evicted)
        self.chunk += 1

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.chunk = 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def live_nbytes(self) -> int:
        """Bytes of the cache slots the next step attends to, plus the memories: what a growing cache would use."""
        used = (min(self.chunk, self.layout.history_chunks) + 1) / (self.layout.history_chunks + 1)
        return sum(int(used * (c.k.nbytes + c.v.nbytes)) + (c.memory.nbytes() if c.memory else 0)
                   for c in self.layers)

    def tensors(self) -> List[Tensor]:
        return [t for layer in self.layers for t in layer.tensors()]


class LayerCache:
    """Keys (before RoPE) and values of ``[history chunks in cache order | current chunk]``, plus the memory."""

    def __init__(self, stream: StreamState, batch, heads, head_dim, value_dim, dtype, device):
        self.stream = stream
        n = stream.layout.cache_tokens
        self.k = torch.zeros(batch, n, heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, n, heads, value_dim, dtype=dtype, device=device)
        cfg = stream.config
        self.memory = None
        if cfg.memory and stream.layout.bounded:
            # float32 state for any activation dtype (float64 activations keep float64, for exactness checks)
            state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            self.memory = LinearMemory(batch, heads, head_dim, value_dim, device, cfg.eps, state_dtype)
        self.phi = feature_map(cfg.feature_map)

    def tensors(self) -> List[Tensor]:
        extra = [] if self.memory is None else [self.memory.z, self.memory.M, self.memory.count]
        return [self.k, self.v] + extra

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        if self.memory is not None:
            self.memory.reset()

    def _rotate(self, x: Tensor, positions) -> Tensor:
        h, w = self.stream.frame_hw
        return self.stream.rope.apply(x, positions, h, w)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Write the chunk's ``k``, ``v`` ``[B, chunk_tokens, H, D]`` (pre-RoPE) into its slots and attend.

        Returns the window attention output, the raw memory readout (or None) and a 0/1 scalar telling whether the
        memory holds anything (multiply the projected readout by it; no host sync).
        """
        layout, cfg = self.stream.layout, self.stream.config
        T = layout.chunk_tokens
        if q.shape[1] != T or k.shape[1] != T:
            raise ValueError(f"a streaming step takes one chunk of {T} tokens, got q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}")
        n, positions = self.stream.view()
        self.k[:, (n - 1) * T:n * T].copy_(k)
        self.v[:, (n - 1) * T:n * T].copy_(v)
        keys = self._rotate(self.k[:, :n * T], positions)
        q_rot = self._rotate(q, positions[-layout.frames_per_chunk:])
        out = window_attention(q_rot, keys, self.v[:, :n * T], None, cfg.sparsity_ratio, cfg.block_size, cfg.backend)
        if self.memory is None:
            return out, None, None
        if cfg.memory_mode == 'hybrid_forcing':
            mem = self.memory.read(q_rot, self.phi(q))
        else:
            mem = self.memory.read(self.phi(q), self.phi(q))
        return out, mem, (self.memory.count > 0).to(out.dtype)

    def commit(self, evicted: bool) -> None:
        """Absorb and shift out the oldest window chunk when ``evicted`` (the stream decides once for all layers)."""
        layout, cfg, chunk = self.stream.layout, self.stream.config, self.stream.chunk
        T, f, S = layout.chunk_tokens, layout.frames_per_chunk, layout.sink_chunks
        if self.memory is not None and cfg.memory_mode == 'hybrid_forcing':
            sink = chunk - layout.window_chunks  # the original also absorbs each sink chunk once, W chunks later
            if 0 <= sink < S:
                k_sink = self._rotate(self.k[:, sink * T:(sink + 1) * T], range(sink * f, (sink + 1) * f))
                self._absorb(k_sink, self.v[:, sink * T:(sink + 1) * T], chunk)
        if not evicted:
            return  # warming up: the current chunk already sits where the next step expects its history
        a, b = S * T, (layout.history_chunks + 1) * T
        if self.memory is not None:
            self._absorb(self.k[:, a:a + T], self.v[:, a:a + T], chunk)
        self.k[:, a:b - T].copy_(self.k[:, a + T:b].clone())
        self.v[:, a:b - T].copy_(self.v[:, a + T:b].clone())

    def _absorb(self, k: Tensor, v: Tensor, chunk: int) -> None:
        if self.stream.config.memory_mode == 'hybrid_forcing':
            layout = self.stream.layout
            start = layout.query_start(chunk + 1) - (layout.window_chunks + 1) * layout.frames_per_chunk
            self.memory.absorb(self.phi(k), self._rotate(k, range(start, start + layout.frames_per_chunk)), v)
        else:
            self.memory.absorb(self.phi(k), self.phi(k), v)
