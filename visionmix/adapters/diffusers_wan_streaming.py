"""Hybrid Forcing streaming generation with diffusers' ``WanTransformer3DModel``.

Hybrid Forcing (https://arxiv.org/abs/2604.10103) on Wan (https://arxiv.org/abs/2503.20314): the video is generated
in chunks of ``layout.frames_per_chunk`` latent frames; every self-attention (``attn1``) attends from a preallocated
rolling cache (sink + window, optional top-k block sparsity) plus a linear memory of evicted chunks, see
:mod:`visionmix.adapters.streaming`. Cross-attention to the text (``attn2``) keeps diffusers' processor.

* :class:`WanStreamingAttnProcessor` replaces ``WanAttnProcessor`` on ``attn1``; with nothing bound it *is*
  ``WanAttnProcessor``, so the model still runs normally.
* :class:`WanStreamingAdapter` installs the processors, allocates a :class:`StreamState`, runs one chunk
  (``denoiser``), builds a :class:`StreamingGenerator`, and computes the whole-video chunk-causal forward
  (``forward_chunk_causal``) that a stream equals.

The memory readout goes through a per-layer ``nn.Linear(head_dim, head_dim)`` shared over heads, zero-initialised
(the memory starts silent), registered on the transformer as ``transformer.stream_memory_proj`` so that its
weights are in ``transformer.state_dict()`` under ``stream_memory_proj.{block}.weight`` / ``.bias``. Load trained
ones with ``transformer.load_state_dict`` after building the adapter (``from_pretrained`` drops them as unexpected).

Wan 2.1 style only: the temporal patch size must be 1 (one token frame per latent frame).
Needs ``diffusers`` (``pip install visionmix[diffusion]``); tested with diffusers 0.42.1.
"""
from contextlib import contextmanager
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_wan import (
    WanAttnProcessor,
    WanTransformer3DModel,
    _get_qkv_projections,
)

from .streaming import HybridConfig, LayerCache, StreamingGenerator, StreamLayout, StreamState, VideoRope

__all__ = ['MEMORY_PROJ', 'WanStreamingAttnProcessor', 'WanStreamingAdapter']

MEMORY_PROJ = 'stream_memory_proj'  # transformer attribute (and state_dict prefix) of the memory projections


class WanStreamingAttnProcessor(WanAttnProcessor):
    """``WanAttnProcessor`` for self-attention that can run one streaming chunk step.

    With ``cache`` (a :class:`LayerCache`) bound, q/k/v are computed as in Wan (projections, RMS norms across heads,
    heads unflattened), the model's ``rotary_emb`` is ignored (the cache rotates at stream positions),
    ``cache.attend`` runs the window attention and ``memory_proj(readout) * active`` is added before ``to_out``.
    With ``attn_mask`` bound (and no cache) it is the stock processor with that mask. Otherwise it is the stock one.
    """

    def __init__(self):
        super().__init__()
        self.cache: Optional[LayerCache] = None
        self.memory_proj: Optional[nn.Module] = None
        self.attn_mask: Optional[torch.Tensor] = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if self.cache is None:
            mask = attention_mask if self.attn_mask is None else self.attn_mask
            return super().__call__(attn, hidden_states, encoder_hidden_states, mask, rotary_emb)
        if attn.add_k_proj is not None or encoder_hidden_states is not None:
            raise NotImplementedError('streaming runs self-attention only: added image keys/values (add_k_proj) '
                                      'and encoder_hidden_states are not supported on a streamed layer')
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        out, mem, active = self.cache.attend(query, key, value)
        if mem is not None:
            if self.memory_proj is None:
                raise ValueError('a cache with a memory is bound but no memory_proj is')
            out = out + self.memory_proj(mem) * active
        hidden_states = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


class WanStreamingAdapter:
    """Stream a ``WanTransformer3DModel`` chunk by chunk.

    Args:
        transformer: a diffusers ``WanTransformer3DModel`` with ``patch_size[0] == 1``; its ``attn1`` processors
            are replaced by :class:`WanStreamingAttnProcessor` (attention backend kept) and it gets
            ``stream_memory_proj`` (kept if already there, e.g. from an earlier adapter).
        layout: chunk geometry; ``tokens_per_frame`` must be ``(H / p_h) * (W / p_w)`` of the latents
            (checked by :meth:`new_state`).
        config: window attention / memory settings (default ``HybridConfig()``).
    """

    num_train_timesteps = 1000  # Wan's scheduler: timestep = 1000 * sigma

    def __init__(self, transformer, layout: StreamLayout, config: Optional[HybridConfig] = None):
        if not isinstance(transformer, WanTransformer3DModel):
            raise ValueError(f"transformer must be a diffusers WanTransformer3DModel, got {type(transformer).__name__}")
        if not isinstance(layout, StreamLayout):
            raise ValueError(f"layout must be a StreamLayout, got {type(layout).__name__}")
        config = HybridConfig() if config is None else config
        if not isinstance(config, HybridConfig):
            raise ValueError(f"config must be a HybridConfig, got {type(config).__name__}")
        p_t, p_h, p_w = transformer.config.patch_size
        if p_t != 1:
            raise ValueError(f"patch_size must have a temporal patch of 1 (Wan 2.1 style: one token frame per latent "
                             f"frame), got patch_size={tuple(transformer.config.patch_size)}")
        self.transformer, self.layout, self.config, self.patch_hw = transformer, layout, config, (p_h, p_w)
        self.attns = [block.attn1 for block in transformer.blocks]
        if any(attn.is_cross_attention for attn in self.attns):
            raise ValueError('transformer has a cross-attention attn1; streaming needs self-attention there')
        self.head_dim = self.attns[0].inner_dim // self.attns[0].heads
        proj = getattr(transformer, MEMORY_PROJ, None)
        if not isinstance(proj, nn.ModuleList) or len(proj) != len(self.attns):
            weight = transformer.proj_out.weight
            proj = nn.ModuleList(nn.Linear(self.head_dim, self.head_dim, device=weight.device, dtype=weight.dtype)
                                 for _ in self.attns)
            for linear in proj:
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)
            setattr(transformer, MEMORY_PROJ, proj)
        self.processors = []
        for attn in self.attns:
            proc = attn.processor
            if not isinstance(proc, WanStreamingAttnProcessor):
                proc = WanStreamingAttnProcessor()
                proc._attention_backend = getattr(attn.processor, '_attention_backend', None)
                proc._parallel_config = getattr(attn.processor, '_parallel_config', None)
                attn.set_processor(proc)
            self.processors.append(proc)
        self.rope = VideoRope(self.head_dim, theta=float(getattr(transformer.rope, 'theta', 10000.0)))

    @property
    def memory_proj(self) -> nn.ModuleList:
        return getattr(self.transformer, MEMORY_PROJ)

    def token_grid(self, latent_hw: Sequence[int], name: str = 'latent_hw') -> Tuple[int, int]:
        """Tokens per latent frame ``(H / p_h, W / p_w)``; a ValueError naming ``name`` unless the layout's."""
        (height, width), (p_h, p_w) = tuple(latent_hw), self.patch_hw
        if height % p_h or width % p_w or (height // p_h) * (width // p_w) != self.layout.tokens_per_frame:
            raise ValueError(f"{name} must have (H, W) multiples of the patch ({p_h}, {p_w}) with (H / {p_h}) * "
                             f"(W / {p_w}) = layout.tokens_per_frame = {self.layout.tokens_per_frame}, got "
                             f"{tuple(latent_hw)}")
        return height // p_h, width // p_w

    def new_state(self, batch: int, latent_hw: Sequence[int], device=None, dtype=None) -> StreamState:
        """A preallocated state with one cache per block, for latents ``[batch, C, frames, *latent_hw]``."""
        weight = self.transformer.proj_out.weight
        state = StreamState(self.layout, self.config, self.token_grid(latent_hw), self.rope)
        for attn in self.attns:
            state.add_layer(batch, attn.heads, attn.inner_dim // attn.heads, dtype=dtype or weight.dtype,
                            device=weight.device if device is None else device)
        return state

    @contextmanager
    def _bound(self, caches=None, attn_mask=None):
        caches = [None] * len(self.processors) if caches is None else caches
        for proc, cache, proj in zip(self.processors, caches, self.memory_proj):
            proc.cache, proc.memory_proj, proc.attn_mask = cache, proj, attn_mask
        try:
            yield
        finally:
            for proc in self.processors:
                proc.cache = proc.attn_mask = None

    def denoiser(self, x_chunk: torch.Tensor, sigma, state: StreamState, encoder_hidden_states: torch.Tensor,
                 **forward_kwargs) -> torch.Tensor:
        """Flow velocity for the stream's current chunk ``[B, C, frames_per_chunk, H, W]`` at noise level ``sigma``.

        ``sigma`` in [0, 1] (a float or ``[B]``) is passed as ``timestep = 1000 * sigma``; ``forward_kwargs`` go
        to the transformer (e.g. ``encoder_hidden_states_image``). The chunk's keys/values are written into the
        state's current slots; ``state.commit()`` keeps them.
        """
        if len(state.layers) != len(self.processors) or state.layout != self.layout:
            raise ValueError("state must come from this adapter's new_state (one cache per block, same layout)")
        (h, w), (p_h, p_w) = state.frame_hw, self.patch_hw
        if x_chunk.dim() != 5 or tuple(x_chunk.shape[2:]) != (self.layout.frames_per_chunk, h * p_h, w * p_w):
            raise ValueError(f"x_chunk must be one chunk [B, C, {self.layout.frames_per_chunk}, {h * p_h}, {w * p_w}] "
                             f"(the state's latent size), got {tuple(x_chunk.shape)}")
        sigma = torch.as_tensor(sigma, device=x_chunk.device).expand(x_chunk.shape[0])
        with self._bound(state.layers):
            return self.transformer(hidden_states=x_chunk, timestep=sigma * self.num_train_timesteps,
                                    encoder_hidden_states=encoder_hidden_states, return_dict=False,
                                    **forward_kwargs)[0]

    def generator(self, state: StreamState, encoder_hidden_states: torch.Tensor,
                  chunk_shape: Optional[Sequence[int]] = None, sigmas=None, **forward_kwargs) -> StreamingGenerator:
        """A :class:`StreamingGenerator` over :meth:`denoiser`.

        ``chunk_shape`` defaults to ``[batch, out_channels, frames_per_chunk, H, W]`` of the state. Models with extra
        input channels (image conditioning) need a denoiser that concatenates them to the noisy chunk.
        """
        k, cfg = state.layers[0].k, self.transformer.config
        if chunk_shape is None:
            (h, w), (p_h, p_w) = state.frame_hw, self.patch_hw
            chunk_shape = (k.shape[0], cfg.out_channels or cfg.in_channels, self.layout.frames_per_chunk,
                           h * p_h, w * p_w)
        denoiser = lambda x, sigma, st: self.denoiser(x, sigma, st, encoder_hidden_states, **forward_kwargs)
        return StreamingGenerator(denoiser, state, chunk_shape, sigmas, device=k.device, dtype=k.dtype)

    def chunk_mask(self, num_chunks: int, device=None) -> torch.Tensor:
        """Boolean ``[1, 1, N, N]`` token mask: query chunk ``c`` sees key chunks ``layout.history(c) + [c]``.

        Block-causal for an unbounded window; sink + window for a bounded one. With Wan's absolute RoPE this is the
        stream exactly when ``rope_frame_cap`` is None and attention is dense without memory (the stream's relative
        positions then equal the absolute ones); otherwise it shows which chunks are visible.
        """
        visible = torch.zeros(num_chunks, num_chunks, dtype=torch.bool)
        for c in range(num_chunks):
            visible[c, self.layout.history(c) + [c]] = True
        T = self.layout.chunk_tokens
        return visible.repeat_interleave(T, 0).repeat_interleave(T, 1)[None, None].to(device)

    def forward_chunk_causal(self, latents: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                             **forward_kwargs) -> torch.Tensor:
        """The model on the whole video ``[B, C, n * frames_per_chunk, H, W]`` with :meth:`chunk_mask` attention.

        Every ``attn1`` uses diffusers' own ``rotary_emb`` and the mask (through ``dispatch_attention_fn``).
        Clean-pass semantics: streaming ``latents`` chunk by chunk, each chunk run once through :meth:`denoiser` at
        ``sigma = timestep / 1000`` and committed, gives this output (unbounded window, or a bounded one with no
        ``rope_frame_cap``; dense attention; no memory).
        """
        f = self.layout.frames_per_chunk
        if latents.dim() != 5 or latents.shape[2] % f:
            raise ValueError(f"latents must be [B, C, k * {f}, H, W] (whole chunks), got {tuple(latents.shape)}")
        self.token_grid(latents.shape[3:], 'latents')
        mask = self.chunk_mask(latents.shape[2] // f, latents.device)
        with self._bound(attn_mask=mask):
            return self.transformer(hidden_states=latents, timestep=timestep,
                                    encoder_hidden_states=encoder_hidden_states, return_dict=False,
                                    **forward_kwargs)[0]
