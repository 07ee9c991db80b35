"""Hybrid Forcing streaming of a tiny randomly initialised diffusers ``WanTransformer3DModel``."""
import pytest
import torch

pytest.importorskip('diffusers', reason='diffusers is not installed (pip install visionmix[diffusion])')

from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

from visionmix.adapters.diffusers_wan_streaming import (  # noqa: E402
    MEMORY_PROJ,
    WanStreamingAdapter,
    WanStreamingAttnProcessor,
)
from visionmix.adapters.streaming import HybridConfig, StreamLayout, VideoRope  # noqa: E402

HEAD_DIM, F = 12, 3  # latent frames per chunk


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _wan(dtype=torch.float32, patch_size=(1, 2, 2)):
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=patch_size, num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms start at one: perturb everything
            p.add_(0.1 * torch.randn_like(p))
    model = model.to(dtype)
    if dtype == torch.float64:  # Wan rounds its float64 RoPE tables to float32; rebuild them unrounded
        rope, cos, sin = model.rope, [], []
        for dim in (rope.t_dim, rope.h_dim, rope.w_dim):
            inv_freq = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
            angles = torch.outer(torch.arange(rope.max_seq_len, dtype=torch.float64), inv_freq)
            cos.append(angles.cos().repeat_interleave(2, 1))
            sin.append(angles.sin().repeat_interleave(2, 1))
        rope.freqs_cos, rope.freqs_sin = torch.cat(cos, 1), torch.cat(sin, 1)
    return model


def _inputs(frames=9, hw=8, dtype=torch.float32):
    torch.manual_seed(1)
    return torch.randn(1, 4, frames, hw, hw, dtype=dtype), torch.randn(1, 5, 16, dtype=dtype)


def _unbounded(chunks=3, hw=8):
    return StreamLayout(F, (hw // 2) ** 2, window_chunks=None, max_chunks=chunks)


def _stream(adapter, latents, text, sigma):
    """Each chunk run once at ``sigma`` and committed (the clean pass)."""
    state = adapter.new_state(1, latents.shape[3:], dtype=latents.dtype)
    outs = []
    for c in range(latents.shape[2] // F):
        outs.append(adapter.denoiser(latents[:, :, c * F:(c + 1) * F], sigma, state, text))
        state.commit()
    return torch.cat(outs, 2)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64], ids=['fp32', 'fp64'])
def test_video_rope_equals_wan_rope(dtype):
    model = _wan(dtype)
    latents, _ = _inputs(dtype=dtype)
    cos, sin = model.rope(latents)  # [1, N, 1, head_dim], each angle repeated on a channel pair
    ref_cos, ref_sin = VideoRope(HEAD_DIM).cos_sin(range(9), 4, 4, dtype=dtype)
    for table, ref in ((cos, ref_cos), (sin, ref_sin)):
        assert torch.equal(table[0, :, 0, 0::2], table[0, :, 0, 1::2])
        assert (table[0, :, 0, 0::2] - ref).abs().max().item() < (1e-15 if dtype == torch.float64 else 1e-7)


@torch.no_grad()
def test_unbound_processor_is_stock():
    model = _wan()
    latents, text = _inputs()
    timestep = torch.tensor([370.0])
    stock = model(latents, timestep, text, return_dict=False)[0]
    adapter = WanStreamingAdapter(model, _unbounded(), HybridConfig(memory=False))
    assert all(isinstance(b.attn1.processor, WanStreamingAttnProcessor) for b in model.blocks)
    assert all(type(b.attn2.processor) is WanAttnProcessor for b in model.blocks)  # cross-attention untouched
    assert torch.equal(model(latents, timestep, text, return_dict=False)[0], stock)
    _stream(adapter, latents, text, 0.37)
    adapter.forward_chunk_causal(latents, timestep, text)
    assert torch.equal(model(latents, timestep, text, return_dict=False)[0], stock)  # unbound again
    assert WanStreamingAdapter(model, _unbounded()).processors == adapter.processors  # reinstalling keeps them


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=['fp32', 'fp64'])
@torch.no_grad()
def test_stream_equals_chunk_causal_forward(dtype, tol):
    model = _wan(dtype)
    latents, text = _inputs(frames=12, dtype=dtype)
    adapter = WanStreamingAdapter(model, _unbounded(chunks=4), HybridConfig(memory=False))
    sigma = torch.tensor([0.37], dtype=dtype)
    ref = adapter.forward_chunk_causal(latents, sigma * 1000, text)
    assert _rel(_stream(adapter, latents, text, sigma), ref) < tol


@torch.no_grad()
def test_bounded_window_without_rope_cap_equals_windowed_mask():
    model = _wan(torch.float64)
    latents, text = _inputs(frames=12, dtype=torch.float64)
    layout = StreamLayout(F, 16, sink_chunks=1, window_chunks=1)  # chunk 3 sees chunks 0, 2 and itself
    adapter = WanStreamingAdapter(model, layout, HybridConfig(memory=False))
    assert adapter.chunk_mask(4)[0, 0, ::48, ::48].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]]
    sigma = torch.tensor([0.6], dtype=torch.float64)
    ref = adapter.forward_chunk_causal(latents, sigma * 1000, text)
    assert _rel(_stream(adapter, latents, text, sigma), ref) < 1e-12


@torch.no_grad()
def test_chunk_causal_forward_is_causal():
    model = _wan(torch.float64)
    latents, text = _inputs(dtype=torch.float64)
    timestep = torch.tensor([500.0], dtype=torch.float64)
    stock = model(latents, timestep, text, return_dict=False)[0]
    adapter = WanStreamingAdapter(model, _unbounded(), HybridConfig(memory=False))
    out = adapter.forward_chunk_causal(latents, timestep, text)
    changed = latents.clone()
    changed[:, :, -F:] = torch.randn_like(changed[:, :, -F:])
    out_changed = adapter.forward_chunk_causal(changed, timestep, text)
    assert _rel(out_changed[:, :, :-F], out[:, :, :-F]) < 1e-12
    assert _rel(out_changed[:, :, -F:], out[:, :, -F:]) > 1e-2
    assert _rel(out[:, :, :-F], stock[:, :, :-F]) > 1e-3  # the stock model is bidirectional


def _hybrid(memory=True):
    model = _wan()
    layout = StreamLayout(F, 4, sink_chunks=1, window_chunks=1, rope_frame_cap=6)
    adapter = WanStreamingAdapter(model, layout, HybridConfig(memory=memory, sparsity_ratio=0.5, block_size=8))
    torch.manual_seed(2)
    text = torch.randn(1, 5, 16)
    return model, adapter, text


def _generate(adapter, text, chunks, seed=3):
    state = adapter.new_state(1, (4, 4))
    gen = adapter.generator(state, text, sigmas=[1.0])
    return state, list(gen.generate(chunks, generator=torch.Generator().manual_seed(seed)))


def test_long_stream_keeps_memory_flat():
    model, adapter, text = _hybrid()
    with torch.no_grad():
        for proj in adapter.memory_proj:
            proj.weight.normal_(0, 0.2)
    state = adapter.new_state(1, (4, 4))
    assert all(layer.memory is not None for layer in state.layers)
    nbytes, ptrs = state.nbytes(), [t.data_ptr() for t in state.tensors()]
    gen = adapter.generator(state, text, sigmas=[1.0])
    assert gen.chunk_shape == (1, 4, F, 4, 4)
    chunks = 52
    for c, x0 in enumerate(gen.generate(chunks, generator=torch.Generator().manual_seed(0))):
        assert x0.shape == (1, 4, F, 4, 4) and torch.isfinite(x0).all()
        assert state.nbytes() == nbytes and [t.data_ptr() for t in state.tensors()] == ptrs
        evicted = max(0, c - 1)  # sink 1 + window 1: committing chunk c >= 2 evicts chunk c - 1
        assert all(layer.memory.count.item() == evicted * 12 for layer in state.layers)
    assert state.chunk == chunks
    assert [f'{MEMORY_PROJ}.{i}.{p}' for i in range(2) for p in ('weight', 'bias')] == \
        [k for k in model.state_dict() if k.startswith(MEMORY_PROJ)]


def test_memory_readout_goes_through_memory_proj():
    _, adapter, text = _hybrid(memory=False)
    _, off = _generate(adapter, text, 6)
    model, adapter, text = _hybrid()
    _, silent = _generate(adapter, text, 6)
    assert all(torch.equal(a, b) for a, b in zip(off, silent))  # zero-initialised projection
    with torch.no_grad():
        for proj in adapter.memory_proj:
            proj.bias.normal_()
    _, used = _generate(adapter, text, 6)
    assert all(torch.equal(a, b) for a, b in zip(off[:3], used[:3]))  # memory empty until chunk 1 is evicted
    assert all(_rel(a, b) > 1e-4 for a, b in zip(off[3:], used[3:]))
    fresh = _wan()  # trained projections load with the rest of the weights
    WanStreamingAdapter(fresh, adapter.layout, adapter.config)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.stream_memory_proj[1].bias, adapter.memory_proj[1].bias)


def test_bad_inputs():
    layout = _unbounded()
    with pytest.raises(ValueError, match='patch_size'):
        WanStreamingAdapter(_wan(patch_size=(2, 2, 2)), layout)
    with pytest.raises(ValueError, match='transformer'):
        WanStreamingAdapter(torch.nn.Linear(2, 2), layout)
    adapter = WanStreamingAdapter(_wan(), layout, HybridConfig(memory=False))
    with pytest.raises(ValueError, match='latent_hw'):
        adapter.new_state(1, (6, 6))
    with pytest.raises(ValueError, match='latent_hw'):
        adapter.new_state(1, (8, 7))
    latents, text = _inputs()
    state = adapter.new_state(1, (8, 8))
    with pytest.raises(ValueError, match='x_chunk'):
        adapter.denoiser(latents[:, :, :2], 0.5, state, text)
    with pytest.raises(ValueError, match='x_chunk'):
        adapter.denoiser(latents[:, :, :F, :4], 0.5, state, text)
    with pytest.raises(ValueError, match='latents'):
        adapter.forward_chunk_causal(latents[:, :, :8], torch.tensor([500.0]), text)
    with pytest.raises(ValueError, match='latents'):
        adapter.forward_chunk_causal(latents[..., :6, :6], torch.tensor([500.0]), text)
