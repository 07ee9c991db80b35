"""Chunk-causal few-step generation over a streaming state.

Each chunk starts from fresh noise and is denoised in a few flow-matching steps (``x_t = (1 - s) x_0 + s eps``;
the model predicts the velocity ``eps - x_0``; each step predicts ``x_0`` and re-noises it to the next level with
fresh noise, as Self Forcing and Hybrid Forcing sample). Every step writes the chunk's keys and values into the
same cache slots; a last pass on the clean chunk at level 0 leaves clean keys and values there, then the state
commits the chunk (evicting and absorbing the oldest window chunk). On CUDA one steady-state chunk step can be
captured in a CUDA graph and replayed.
"""
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from .state import StreamState

__all__ = ['shifted_sigmas', 'StreamingGenerator']


def shifted_sigmas(steps: Sequence[float] = (1000, 750, 500, 250), shift: float = 5.0,
                   num_train_timesteps: int = 1000) -> Tensor:
    """Noise levels of the few-step sampler: timesteps in ``(0, T]`` through the flow shift.

    ``s -> shift * s / (1 + (shift - 1) * s)`` with ``s = t / T``, as Wan's flow-matching scheduler.
    """
    s = torch.tensor([float(t) / num_train_timesteps for t in steps], dtype=torch.float64)
    if bool(((s <= 0) | (s > 1)).any()):
        raise ValueError(f"steps must lie in (0, {num_train_timesteps}], got {list(steps)}")
    return (shift * s / (1 + (shift - 1) * s)).float()


class StreamingGenerator:
    """Drive ``denoiser(x_chunk, sigma, state) -> velocity`` chunk by chunk.

    ``denoiser`` runs one chunk ``[B, C, frames_per_chunk, H, W]`` at noise level ``sigma`` (a float tensor
    ``[B]``) through a model whose attention layers use ``state``'s caches.
    """

    def __init__(self, denoiser: Callable[[Tensor, Tensor, StreamState], Tensor], state: StreamState,
                 chunk_shape: Sequence[int], sigmas: Optional[Tensor] = None, device=None, dtype=torch.float32):
        self.denoiser, self.state = denoiser, state
        self.chunk_shape = tuple(chunk_shape)
        self.sigmas = shifted_sigmas() if sigmas is None else sigmas
        self.device, self.dtype = device, dtype
        self._graph = self._static_noise = self._static_out = None

    @property
    def sigmas(self) -> Tensor:
        return torch.tensor(self._levels)

    @sigmas.setter
    def sigmas(self, sigmas) -> None:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        if sigmas.dim() != 1 or not len(sigmas) or bool(((sigmas <= 0) | (sigmas > 1)).any()):
            raise ValueError(f"sigmas must be a non-empty 1-D list of noise levels in (0, 1], got {sigmas.tolist()}")
        self._levels = [float(s) for s in sigmas]  # Python floats: a step never reads a tensor back to the host

    def _level(self, sigma: float) -> Tensor:
        return torch.full((self.chunk_shape[0],), float(sigma), device=self.device, dtype=self.dtype)

    def denoise_chunk(self, noises: Tensor) -> Tensor:
        """Generate the current chunk from ``noises`` ``[steps, *chunk_shape]`` (the first is the start noise)."""
        x = noises[0]
        x0 = x
        levels = self._levels
        for i, sigma in enumerate(levels):
            velocity = self.denoiser(x, self._level(sigma), self.state)
            x0 = x - sigma * velocity
            if i + 1 < len(levels):
                x = (1 - levels[i + 1]) * x0 + levels[i + 1] * noises[i + 1]
        return x0

    def encode_clean(self, x0: Tensor) -> None:
        """Write the clean chunk's keys and values into the cache and commit it."""
        self.denoiser(x0, self._level(0.0), self.state)
        self.state.commit()

    def step(self, noises: Tensor) -> Tensor:
        x0 = self.denoise_chunk(noises)
        self.encode_clean(x0)
        return x0

    def sample_noise(self, generator: Optional[torch.Generator] = None) -> Tensor:
        return torch.randn(len(self._levels), *self.chunk_shape, generator=generator, device=self.device,
                           dtype=self.dtype)

    @torch.no_grad()
    def generate(self, num_chunks: int, prime: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                 use_cuda_graph: bool = False) -> Iterator[Tensor]:
        """Yield ``num_chunks`` chunks; the first ``prime.shape[2] // frames_per_chunk`` are given (encoded, not drawn).

        ``prime`` is ``[B, C, frames, H, W]`` ground truth the stream continues from.
        """
        if use_cuda_graph and torch.device(self.device or 'cpu').type != 'cuda':
            raise ValueError(f"use_cuda_graph=True needs the generator on a CUDA device, got device={self.device}")
        f = self.chunk_shape[2]
        primed = 0
        if prime is not None:
            if prime.dim() != 5 or prime.shape[2] % f or tuple(prime.shape[:2]) != self.chunk_shape[:2] \
                    or tuple(prime.shape[3:]) != self.chunk_shape[3:]:
                raise ValueError(f"prime must be [B, C, k * {f}, H, W] matching chunk_shape {self.chunk_shape}, got "
                                 f"{tuple(prime.shape)}")
            primed = prime.shape[2] // f
        for c in range(num_chunks):
            if c < primed:
                chunk = prime[:, :, c * f:(c + 1) * f].to(self.device, self.dtype)
                self.encode_clean(chunk)
                yield chunk
                continue
            noises = self.sample_noise(generator)
            if use_cuda_graph and self.steady():
                yield self._graph_step(noises)
            else:
                yield self.step(noises)

    def steady(self) -> bool:
        """True once every chunk step is the same computation (full window, RoPE positions no longer moving)."""
        layout, c = self.state.layout, self.state.chunk
        if not layout.bounded or c <= layout.history_chunks:
            return False
        if layout.rope_frame_cap is not None:
            return layout.query_start(c) == layout.rope_frame_cap
        # without a cap only relative positions are constant: fine unless a sink or rotated memory sees absolutes
        return layout.sink_chunks == 0 and self.state.config.memory_mode == 'visionmix'

    def _graph_step(self, noises: Tensor) -> Tensor:
        """First steady call: one eager step on a side stream (warms caches and allocator). Second: capture, then
        replay; the state's clock is advanced here, since replays do not run Python."""
        if self._static_noise is None:
            self._static_noise = noises.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(self._static_noise)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self._graph is None:
            self._graph = torch.cuda.CUDAGraph()
            chunk = self.state.chunk
            with torch.cuda.graph(self._graph):
                self._static_out = self.step(self._static_noise)
            self.state.chunk = chunk
        self._static_noise.copy_(noises)
        self._graph.replay()
        self.state.chunk += 1
        return self._static_out.clone()
