"""GRAT attention processors for diffusers' joint-attention DiTs (training-free).

GRAT: https://arxiv.org/abs/2505.14687; official code (HunyuanVideo, GRAT-X): https://github.com/OliverRensu/GRAT.

* :class:`FluxGratAttnProcessor` replaces ``FluxAttnProcessor`` (``FluxTransformer2DModel``): the sequence is
  ``[text, image]``, RoPE covers both.
* :class:`HunyuanVideoGratAttnProcessor` replaces ``HunyuanVideoAttnProcessor2_0``
  (``HunyuanVideoTransformer3DModel``): the sequence is ``[image, text]``, RoPE covers the image only.

Both take the call arguments of the processor they replace and compute the same projections, norms and RoPE;
only the attention itself becomes :func:`visionmix.layers.grat.grat_attention`. The image tokens are regrouped
after RoPE, so positions are untouched. Text tokens form one dense block; text keys are hidden where diffusers'
boolean ``attention_mask`` (``[B, N]`` or ``[B, 1, 1, N]``, the key mask HunyuanVideo builds from the prompt
mask, per batch item) or ``attenable_text`` says so. The official code bakes the prompt length of one prompt into
the mask and ignores ``attention_mask``; taking the mask per item also handles a batch of prompts of different
lengths (classifier-free guidance).

The latent token grid (after patching: ``(H/16, W/16)`` px for Flux, ``(T, H/16, W/16)`` latent frames x tokens
for HunyuanVideo) is a constructor argument or a ``set_grid`` call. :func:`apply_grat` installs the processors
on a transformer and reads the grid from each forward call's inputs (Flux ``img_ids``; HunyuanVideo latent
shape), so pipelines need nothing more. It also chooses the layers (default: every dual- and single-stream
block, not HunyuanVideo's token refiner, as the official code) and the timesteps (default: every step, as the
official code) where GRAT applies; elsewhere the original processor runs.

Needs ``diffusers`` (``pip install visionmix[diffusion]``); tested with diffusers 0.42.1.
"""
import inspect
from typing import Callable, Dict, Iterable, Optional, Sequence, Union

import torch
from diffusers.models.embeddings import apply_rotary_emb

from visionmix.layers.grat import grat_attention, grat_index

__all__ = ['FluxGratAttnProcessor', 'HunyuanVideoGratAttnProcessor', 'apply_grat', 'GratHandle']


def _key_mask(attention_mask: Optional[torch.Tensor], batch: int, tokens: int) -> Optional[torch.Tensor]:
    """diffusers' boolean key mask (``[B, N]``, ``[B, 1, N]`` or ``[B, 1, 1, N]``, B may be 1) -> ``[B, N]``."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.shape[-1] != tokens \
            or attention_mask.numel() not in (tokens, batch * tokens) or attention_mask.shape[0] not in (1, batch):
        raise ValueError(f"GRAT processors take a boolean key mask [B, N], [B, 1, N] or [B, 1, 1, N] with N = {tokens} "
                         f"as attention_mask, got {tuple(attention_mask.shape)} {attention_mask.dtype}")
    return attention_mask.reshape(-1, tokens).expand(batch, tokens)


class _GratProcessor:
    """Shared state: the grid, the pattern, the fallback (dense) processor and the on/off switch."""
    _attention_backend = None
    _parallel_config = None
    text_first = True
    default_group_size = (16, 16)

    def __init__(
            self,
            grid: Optional[Sequence[int]] = None,
            group_size: Union[int, Sequence[int], None] = None,
            mode: str = 'X',
            radius: Union[int, Sequence[int]] = 1,
            attenable_text: Optional[int] = None,
            fallback: Optional[Callable] = None,
    ):
        self.group_size = self.default_group_size if group_size is None else group_size
        self.mode, self.radius, self.attenable_text = mode, radius, attenable_text
        self.grid = None
        if grid is not None:
            self.set_grid(grid)
        self.fallback = fallback if fallback is not None else self._default_fallback()
        self.enabled = True

    def set_grid(self, grid: Sequence[int]) -> None:
        """The latent token grid of the next calls (``(H, W)`` or ``(T, H, W)``, after patching)."""
        grat_index(grid, self.group_size, self.mode, self.radius)  # checks divisibility now, not mid-denoising
        self.grid = tuple(int(n) for n in grid)

    def _attend(self, query, key, value, attention_mask):
        """``[B, N, heads, D]`` q/k/v (text and image in the model's order) -> ``[B, N, heads * D]``."""
        if self.grid is None:
            raise ValueError(f"{type(self).__name__} needs the latent token grid: pass grid=..., call set_grid(), "
                             f"or install it with visionmix.adapters.diffusers_grat.apply_grat")
        num_img = torch.Size(self.grid).numel()
        text = query.shape[1] - num_img
        if text < 0:
            raise ValueError(f"{query.shape[1]} tokens are fewer than the {num_img} image tokens of grid {self.grid}")
        out = grat_attention(
            query, key, value, self.grid, self.group_size, self.mode, self.radius, text_tokens=text,
            text_first=self.text_first, attenable_text=self.attenable_text,
            key_mask=_key_mask(attention_mask, query.shape[0], query.shape[1]))
        return out.flatten(2, 3).to(query.dtype)


class FluxGratAttnProcessor(_GratProcessor):
    """GRAT in place of diffusers' ``FluxAttnProcessor`` (dual- and single-stream Flux blocks).

    Args:
        grid: latent token grid ``(H, W)`` (image px / 16), or None to set it later (``set_grid``/``apply_grat``).
        group_size: tokens per group (paper: 16x16).
        mode: ``'X'`` (criss-cross) or ``'B'`` (surrounding blocks).
        radius: GRAT-B radius in groups.
        attenable_text: hide T5 keys from this index on (Flux's dense baseline masks none; None = keep all).
        fallback: processor run while ``enabled`` is False (default: ``FluxAttnProcessor()``).
    """
    text_first = True
    default_group_size = (16, 16)

    @staticmethod
    def _default_fallback():
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
        return FluxAttnProcessor()

    def __call__(
            self,
            attn,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor = None,
            attention_mask: Optional[torch.Tensor] = None,
            image_rotary_emb: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if not self.enabled:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if getattr(attn, 'fused_projections', False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            if getattr(attn, 'fused_projections', False):
                enc_q, enc_k, enc_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                enc_q = attn.add_q_proj(encoder_hidden_states)
                enc_k = attn.add_k_proj(encoder_hidden_states)
                enc_v = attn.add_v_proj(encoder_hidden_states)
            enc_q = attn.norm_added_q(enc_q.unflatten(-1, (-1, attn.head_dim)))
            enc_k = attn.norm_added_k(enc_k.unflatten(-1, (-1, attn.head_dim)))
            enc_v = enc_v.unflatten(-1, (-1, attn.head_dim))
            query, key, value = (torch.cat([e, x], dim=1) for e, x in ((enc_q, query), (enc_k, key), (enc_v, value)))

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self._attend(query, key, value, attention_mask)
        if encoder_hidden_states is None:
            return hidden_states
        text = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states[:, :text], hidden_states[:, text:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


class HunyuanVideoGratAttnProcessor(_GratProcessor):
    """GRAT in place of diffusers' ``HunyuanVideoAttnProcessor2_0`` (dual- and single-stream blocks).

    Args:
        grid: latent token grid ``(T, H, W)`` after patching, or None to set it later.
        group_size: tokens per group (official: 4x8x8).
        mode: ``'X'`` (criss-cross, official) or ``'B'`` (surrounding blocks).
        radius: GRAT-B radius in groups.
        attenable_text: hide text keys from this index on, for every item (the official code's rule); the
            ``attention_mask`` diffusers passes does this per item already.
        fallback: processor run while ``enabled`` is False (default: ``HunyuanVideoAttnProcessor2_0()``).
    """
    text_first = False
    default_group_size = (4, 8, 8)

    @staticmethod
    def _default_fallback():
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
        return HunyuanVideoAttnProcessor2_0()

    def __call__(
            self,
            attn,
            hidden_states: torch.Tensor,
            encoder_hidden_states: Optional[torch.Tensor] = None,
            attention_mask: Optional[torch.Tensor] = None,
            image_rotary_emb: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if not self.enabled:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        joint = attn.add_q_proj is None and encoder_hidden_states is not None  # single-stream block
        if joint:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            if joint:
                text = encoder_hidden_states.shape[1]
                query = torch.cat([apply_rotary_emb(query[:, :-text], image_rotary_emb, sequence_dim=1),
                                   query[:, -text:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :-text], image_rotary_emb, sequence_dim=1),
                                 key[:, -text:]], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            enc_q = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            enc_k = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            enc_v = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                enc_q = attn.norm_added_q(enc_q)
            if attn.norm_added_k is not None:
                enc_k = attn.norm_added_k(enc_k)
            query, key, value = (torch.cat([x, e], dim=1) for x, e in ((query, enc_q), (key, enc_k), (value, enc_v)))

        hidden_states = self._attend(query, key, value, attention_mask)
        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :-text], hidden_states[:, -text:]
            if getattr(attn, 'to_out', None) is not None:
                hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
            if getattr(attn, 'to_add_out', None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


_KINDS = {'FluxTransformer2DModel': FluxGratAttnProcessor,
          'HunyuanVideoTransformer3DModel': HunyuanVideoGratAttnProcessor}


class GratHandle:
    """What :func:`apply_grat` installed: ``processors`` (block name -> processor); ``remove()`` restores the
    original processors and drops the forward hook (a later ``apply_grat`` on the same model does it first)."""

    def __init__(self, transformer, processors: Dict[str, _GratProcessor], originals: Dict[str, Callable], hook):
        self.transformer, self.processors, self._originals, self._hook = transformer, processors, originals, hook

    def set_grid(self, grid: Sequence[int]) -> None:
        for proc in self.processors.values():
            proc.set_grid(grid)

    def remove(self) -> None:
        modules = dict(self.transformer.named_modules())
        for name, original in self._originals.items():
            modules[name].attn.set_processor(original)
        if self._hook is not None:
            self._hook.remove()
        if getattr(self.transformer, '_visionmix_grat', None) is self:
            del self.transformer._visionmix_grat


def _infer_grid(transformer, bound: Dict) -> Optional[tuple]:
    if type(transformer).__name__ == 'HunyuanVideoTransformer3DModel':
        latents = bound.get('hidden_states')
        if latents is None:
            return None
        cfg = transformer.config
        frames, height, width = latents.shape[-3:]
        return frames // cfg.patch_size_t, height // cfg.patch_size, width // cfg.patch_size
    img_ids, latents = bound.get('img_ids'), bound.get('hidden_states')
    if img_ids is None or latents is None:
        return None
    img_ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    height, width = int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1
    if height * width != latents.shape[1]:
        raise ValueError(f"img_ids span a {height}x{width} grid but there are {latents.shape[1]} image tokens "
                         f"(extra conditioning tokens?); pass grid=... to apply_grat")
    return height, width


def apply_grat(
        transformer,
        group_size: Union[int, Sequence[int], None] = None,
        mode: str = 'X',
        radius: Union[int, Sequence[int]] = 1,
        grid: Optional[Sequence[int]] = None,
        attenable_text: Optional[int] = None,
        layers: Union[Iterable[int], Callable[[str], bool], None] = None,
        timesteps: Optional[Callable[[float], bool]] = None,
) -> GratHandle:
    """Install GRAT processors on a ``FluxTransformer2DModel`` or ``HunyuanVideoTransformer3DModel``.

    Args:
        group_size, mode, radius, attenable_text: the processors' arguments (default group: 16x16 for Flux,
            4x8x8 for HunyuanVideo).
        grid: fixed latent token grid; None reads it from every forward call (Flux ``img_ids``, HunyuanVideo
            ``hidden_states`` shape).
        layers: which blocks get GRAT: None = every block in ``transformer_blocks`` and
            ``single_transformer_blocks`` (HunyuanVideo's token refiner keeps its processor); indices into the
            dual-stream then single-stream blocks; or a predicate on names like ``'single_transformer_blocks.3'``.
        timesteps: predicate on the ``timestep`` the pipeline passes to the transformer (Flux pipelines pass
            sigma in [0, 1], HunyuanVideo pipelines t in [0, 1000]); GRAT runs where it is True and the original
            processor elsewhere. None = every step (official). E.g. dense for the noisiest quarter of a Flux run:
            ``timesteps=lambda t: t < 0.75``.
    """
    proc_cls = _KINDS.get(type(transformer).__name__)
    if proc_cls is None:
        raise ValueError(f"apply_grat supports {sorted(_KINDS)}, got {type(transformer).__name__}")
    previous = getattr(transformer, '_visionmix_grat', None)
    if previous is not None:  # a second call replaces the first one's processors and hook
        previous.remove()
    names = [f'{stack}.{i}' for stack in ('transformer_blocks', 'single_transformer_blocks')
             for i in range(len(getattr(transformer, stack, ())))]
    if layers is None:
        chosen = names
    elif callable(layers):
        chosen = [n for n in names if layers(n)]
    else:
        chosen = [names[i] for i in layers]
    modules = dict(transformer.named_modules())
    processors, originals = {}, {}
    for name in chosen:
        attn = modules[name].attn
        originals[name] = attn.processor
        processors[name] = proc_cls(grid, group_size, mode, radius, attenable_text, fallback=attn.processor)
        attn.set_processor(processors[name])

    hook = None
    if grid is None or timesteps is not None:
        signature = inspect.signature(type(transformer).forward)

        def before_forward(module, args, kwargs):
            bound = signature.bind_partial(module, *args, **kwargs).arguments
            if grid is None:
                found = _infer_grid(module, bound)
                if found is not None:
                    for proc in processors.values():
                        if proc.grid != found:
                            proc.set_grid(found)
            if timesteps is not None and bound.get('timestep') is not None:
                step = bound['timestep']
                active = bool(timesteps(float(step.flatten()[0]) if torch.is_tensor(step) else float(step)))
                for proc in processors.values():
                    proc.enabled = active

        hook = transformer.register_forward_pre_hook(before_forward, with_kwargs=True)
    handle = GratHandle(transformer, processors, originals, hook)
    transformer._visionmix_grat = handle
    return handle
