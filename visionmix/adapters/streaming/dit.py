"""A small chunk-causal video diffusion transformer for streaming generation.

Wan-shaped blocks (https://arxiv.org/abs/2503.20314) at toy scale: patch embedding, 6-way adaLN modulation from
the noise level, self-attention with RMS-normed q/k and 3-D RoPE, GELU MLP; no text conditioning. Attention is
Hybrid Forcing's (https://arxiv.org/abs/2604.10103): softmax over the sink + window (optionally top-k
block-sparse) plus a linear-memory readout, projected by a zero-initialised ``memory_proj`` shared over heads.

Two forward paths compute the same thing: ``forward_chunk`` runs one chunk against a ``StreamState`` (inference),
``forward_clip`` runs every chunk of a clip at once with clean history (teacher forcing, for training).
"""
import math
from typing import Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .layout import StreamLayout
from .memory import feature_map, memory_readout_chunked
from .rope import VideoRope
from .state import HybridConfig, StreamState
from .window_attention import window_attention

__all__ = ['StreamingVideoDiT']


def timestep_embedding(sigma: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of ``1000 * sigma`` (any shape) -> ``[..., dim]``."""
    half, acc = dim // 2, torch.promote_types(sigma.dtype, torch.float32)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=acc) / half)
    args = 1000.0 * sigma.to(acc)[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], -1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class HybridSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = nn.RMSNorm(dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        self.memory_proj = nn.Linear(self.head_dim, self.head_dim)

    def _qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k = self.norm_q(q), self.norm_k(k)
        return tuple(t.unflatten(-1, (self.num_heads, self.head_dim)) for t in (q, k, v))

    def forward_chunk(self, x: Tensor, cache) -> Tensor:
        q, k, v = self._qkv(x)
        out, mem, active = cache.attend(q, k, v)
        if mem is not None:
            out = out + self.memory_proj(mem) * active
        return self.proj(out.flatten(2))

    def forward_clip(self, x: Tensor, plan: dict) -> Tensor:
        """``x`` ``[2B, n * T, dim]``: the clean clip, then the noisy one (see ``StreamingVideoDiT.forward_clip``)."""
        q, k, v = self._qkv(x)
        B2, N, H, D = q.shape
        B, n, T = B2 // 2, plan['num_chunks'], plan['chunk_tokens']
        # keys and values of each chunk's view: its history from the clean clip, itself from its own stream
        src_k = torch.cat([k[:B], k[B:]], 1).unflatten(1, (2 * n, T))  # [B, 2n, T, H, D]
        src_v = torch.cat([v[:B], v[B:]], 1).unflatten(1, (2 * n, T))
        ids = plan['view_ids']  # [2, n, L]: clean views, noisy views (ids into the 2n source chunks)
        keys = src_k[:, ids.flatten()].reshape(B, 2, n, -1, H, D).transpose(0, 1).reshape(2 * B * n, -1, H, D)
        vals = src_v[:, ids.flatten()].reshape(B, 2, n, -1, H, D).transpose(0, 1).reshape(2 * B * n, -1, H, D)
        cos_k, sin_k = plan['rope_k']  # [n, L * T, D]
        cos_q, sin_q = plan['rope_q']  # [n, T, D]
        keys = VideoRope.rotate(keys.unflatten(0, (-1, n)), cos_k, sin_k).flatten(0, 1)  # one table per view
        qv = VideoRope.rotate(q.reshape(2 * B, n, T, H, D), cos_q, sin_q).flatten(0, 1)
        mask = plan['key_mask'].repeat(2 * B, 1)  # [2Bn, L * T]
        cfg: HybridConfig = plan['config']
        out = window_attention(qv, keys, vals, mask, cfg.sparsity_ratio, cfg.block_size, cfg.backend)
        out = out.reshape(2 * B, N, H, D)
        if plan['memory']:
            phi = feature_map(cfg.feature_map)
            mem = memory_readout_chunked(phi(q), phi(k[:B]).repeat(2, 1, 1, 1), v[:B].repeat(2, 1, 1, 1),
                                         plan['absorbed'], T, cfg.eps)
            active = plan['memory_active'].to(out.dtype).repeat_interleave(T)[None, :, None, None]
            out = out + self.memory_proj(mem) * active
        return self.proj(out.flatten(2))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = HybridSelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate='tanh'), nn.Linear(hidden, dim))
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x: Tensor, t: Tensor, attend) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(t).chunk(6, -1)
        x = x + gate1 * attend(self.attn, modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class StreamingVideoDiT(nn.Module):
    """Velocity-predicting video DiT over ``[B, C, frames, H, W]`` chunks."""

    def __init__(self, in_chans: int = 3, frame_size: int = 24, patch_size: int = 4, embed_dim: int = 64,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, frames_per_chunk: int = 3):
        super().__init__()
        if frame_size % patch_size:
            raise ValueError(f"frame_size ({frame_size}) must be a multiple of patch_size ({patch_size})")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        self.in_chans, self.patch_size, self.frames_per_chunk = in_chans, patch_size, frames_per_chunk
        self.grid = (frame_size // patch_size, frame_size // patch_size)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.patch_embed = nn.Linear(in_chans * patch_size ** 2, embed_dim)
        self.time_embed = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(embed_dim, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Linear(embed_dim, 2 * embed_dim)
        self.head = nn.Linear(embed_dim, in_chans * patch_size ** 2)
        self.rope = VideoRope(embed_dim // num_heads)
        self._clip_plans = {}  # (layout, config, chunks, device, dtype) -> plan: built once, reused every step
        self.init_weights()

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # after the global init (the released Hybrid Forcing code lost its zero init to it): the memory starts silent
        for block in self.blocks:
            nn.init.zeros_(block.attn.memory_proj.weight)
            nn.init.zeros_(block.attn.memory_proj.bias)
            nn.init.zeros_(block.modulation.weight)
        nn.init.zeros_(self.modulation_out.weight)
        nn.init.zeros_(self.head.weight)

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    def patchify(self, x: Tensor) -> Tensor:
        B, C, Fr, H, W = x.shape
        p = self.patch_size
        if C != self.in_chans or (H // p, W // p) != self.grid or H % p or W % p:
            raise ValueError(f"x must be [B, {self.in_chans}, frames, {self.grid[0] * p}, {self.grid[1] * p}], got "
                             f"{tuple(x.shape)}")
        x = x.reshape(B, C, Fr, H // p, p, W // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(B, Fr * (H // p) * (W // p), C * p * p)

    def unpatchify(self, x: Tensor, frames: int) -> Tensor:
        B, p, (h, w) = x.shape[0], self.patch_size, self.grid
        x = x.reshape(B, frames, h, w, self.in_chans, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(B, self.in_chans, frames, h * p, w * p)

    def _run(self, x: Tensor, sigma_tokens: Tensor, attend) -> Tensor:
        frames = x.shape[2]
        h = self.patch_embed(self.patchify(x))
        t = self.time_embed(timestep_embedding(sigma_tokens, self.embed_dim))
        for block in self.blocks:
            h = block(h, t, attend)
        shift, scale = self.modulation_out(t).chunk(2, -1)
        return self.unpatchify(self.head(modulate(self.norm_out(h), shift, scale)), frames)

    def new_state(self, layout: StreamLayout, config: HybridConfig, batch: int, device=None,
                  dtype=torch.float32) -> StreamState:
        """A preallocated streaming state with one cache per block."""
        if layout.tokens_per_frame != self.tokens_per_frame or layout.frames_per_chunk != self.frames_per_chunk:
            raise ValueError(f"layout must have tokens_per_frame={self.tokens_per_frame} and frames_per_chunk="
                             f"{self.frames_per_chunk}, got {layout.tokens_per_frame} and {layout.frames_per_chunk}")
        state = StreamState(layout, config, self.grid, self.rope)
        for _ in self.blocks:
            state.add_layer(batch, self.num_heads, self.embed_dim // self.num_heads, dtype=dtype, device=device)
        return state

    def forward_chunk(self, x: Tensor, sigma: Tensor, state: StreamState) -> Tensor:
        """Velocity for one chunk ``[B, C, frames_per_chunk, H, W]`` at noise level ``sigma`` ``[B]``."""
        if x.shape[2] != self.frames_per_chunk:
            raise ValueError(f"x must hold one chunk of {self.frames_per_chunk} frames, got {x.shape[2]}")
        layers = iter(state.layers)
        return self._run(x, sigma[:, None], lambda attn, h: attn.forward_chunk(h, next(layers)))

    def forward_clip(self, clean: Tensor, noisy: Tensor, sigma: Tensor, layout: StreamLayout,
                     config: HybridConfig) -> Tensor:
        """Velocity for every chunk of ``noisy`` when each sees the clean history the stream would have cached.

        ``clean``, ``noisy`` ``[B, C, n * frames_per_chunk, H, W]``; ``sigma`` ``[B, n]`` per-chunk noise levels.
        Equals streaming the clean chunks and denoising chunk ``c`` of ``noisy`` against the cache after ``c``.
        """
        if clean.shape != noisy.shape:
            raise ValueError(f"clean and noisy must have one shape, got {tuple(clean.shape)} and {tuple(noisy.shape)}")
        B, f = clean.shape[0], self.frames_per_chunk
        if clean.shape[2] % f:
            raise ValueError(f"clips must hold whole chunks of {f} frames, got {clean.shape[2]} frames")
        n = clean.shape[2] // f
        if tuple(sigma.shape) != (B, n):
            raise ValueError(f"sigma must be [batch, chunks] = {(B, n)}, got {tuple(sigma.shape)}")
        plan = self.clip_plan(layout, config, n, clean.device, torch.promote_types(clean.dtype, torch.float32))
        T = layout.chunk_tokens
        sig = torch.cat([torch.zeros_like(sigma), sigma]).repeat_interleave(T, 1)  # [2B, n T]
        out = self._run(torch.cat([clean, noisy]), sig, lambda attn, h: attn.forward_clip(h, plan))
        return out[B:]

    def clip_plan(self, layout: StreamLayout, config: HybridConfig, n: int, device,
                  rope_dtype: torch.dtype = torch.float32) -> dict:
        """Views, RoPE tables, masks and memory schedule of every chunk of an ``n``-chunk clip (cached)."""
        key = (layout, config, n, str(device), rope_dtype)
        if key not in self._clip_plans:
            self._clip_plans[key] = self._build_clip_plan(layout, config, n, device, rope_dtype)
        return self._clip_plans[key]

    def _build_clip_plan(self, layout, config, n, device, rope_dtype) -> dict:
        if config.memory and config.memory_mode != 'visionmix':
            raise ValueError("forward_clip trains the 'visionmix' memory mode (one feature map for training and "
                             f"inference), got memory_mode={config.memory_mode!r}")
        f, T, L = self.frames_per_chunk, layout.chunk_tokens, min(layout.history_chunks + 1, n)
        h, w = self.grid
        ids = torch.zeros(2, n, L, dtype=torch.long)
        key_mask = torch.zeros(n, L * T, dtype=torch.bool)
        cos_k, sin_k, cos_q, sin_q = [], [], [], []
        for c in range(n):
            hist = layout.history(c)
            ids[0, c, :len(hist) + 1] = torch.tensor(hist + [c])
            ids[1, c, :len(hist) + 1] = torch.tensor(hist + [n + c])
            key_mask[c, :(len(hist) + 1) * T] = True
            pos = layout.frame_positions(c)
            ck, sk = self.rope.tables(pos + [0] * (L * f - len(pos)), h, w, dtype=rope_dtype)
            cq, sq = self.rope.tables(pos[-f:], h, w, dtype=rope_dtype)
            cos_k.append(ck), sin_k.append(sk), cos_q.append(cq), sin_q.append(sq)
        absorbed = [layout.absorbed(c) for c in range(n)]
        memory = bool(config.memory and layout.bounded and any(absorbed))
        return dict(num_chunks=n, chunk_tokens=T, config=config, view_ids=ids.to(device),
                    key_mask=key_mask.to(device),
                    rope_k=(torch.stack(cos_k).to(device), torch.stack(sin_k).to(device)),
                    rope_q=(torch.stack(cos_q).to(device), torch.stack(sin_q).to(device)),
                    absorbed=absorbed, memory=memory,
                    memory_active=torch.tensor([bool(a) for a in absorbed], device=device))
