"""Streaming engine: layout bookkeeping, RoPE, linear memory, window attention, split consistency, flat state."""
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from visionmix.adapters.streaming import (
    HybridConfig,
    LinearMemory,
    StreamingGenerator,
    StreamingVideoDiT,
    StreamLayout,
    StreamState,
    VideoRope,
    memory_readout_chunked,
    select_key_blocks,
    shifted_sigmas,
    window_attention,
)
from visionmix.kernels.testing import rel_rms_error

PARITY = Path(os.environ.get('VISIONMIX_PARITY_DIR', Path(__file__).resolve().parents[3] / 'shared' / 'parity'))


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = StreamingVideoDiT(frame_size=8, patch_size=4, embed_dim=24, depth=2, num_heads=2, **kw).double()
    for p in model.parameters():  # zero-initialised gates and heads would hide most of the computation
        p.data.normal_(0, 0.3)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize('sink,window', [(1, 2), (0, 1), (2, 1), (1, 0)])
def test_every_evicted_chunk_is_absorbed_exactly_once(sink, window):
    layout = StreamLayout(3, 4, sink, window)
    n = 30
    evicted = [layout.evicted(c) for c in range(n)]
    gone = [c for c in evicted if c is not None]
    assert gone == list(range(sink, n - window))  # each non-sink chunk once, in order, when it leaves the window
    for c in range(n):
        hist = layout.history(c)
        assert hist == sorted(hist) and len(hist) <= sink + window
        assert set(hist) | set(layout.absorbed(c)) == set(range(c))  # in the window or in the memory, never both
        assert not set(hist) & set(layout.absorbed(c))
        assert all(s in hist for s in range(min(sink, c)))  # the sink never leaves


def test_frame_positions_are_relative_and_capped():
    layout = StreamLayout(3, 4, sink_chunks=1, window_chunks=2, rope_frame_cap=12)
    assert layout.frame_positions(2) == list(range(9))  # warm-up: absolute
    assert layout.frame_positions(4) == [0, 1, 2] + list(range(6, 15))  # sink, then chunks 2, 3, 4 at 6..14
    steady = layout.frame_positions(5)
    assert steady == [0, 1, 2] + list(range(6, 15))  # query capped at 12: window keys end at its last frame
    assert all(layout.frame_positions(c) == steady for c in range(5, 40))
    unbounded = StreamLayout(3, 4, 1, None, max_chunks=6)
    assert unbounded.frame_positions(5) == list(range(18)) and unbounded.evicted(5) is None


def test_layout_and_config_reject_bad_arguments():
    with pytest.raises(ValueError, match='max_chunks'):
        StreamLayout(3, 4, 1, None)
    with pytest.raises(ValueError, match='rope_frame_cap'):
        StreamLayout(3, 4, 1, 2, rope_frame_cap=6)
    with pytest.raises(ValueError, match='frames_per_chunk'):
        StreamLayout(0, 4)
    with pytest.raises(ValueError, match='beyond max_chunks'):
        StreamLayout(3, 4, 1, None, max_chunks=4).history(4)
    with pytest.raises(ValueError, match='memory_mode'):
        HybridConfig(memory_mode='sla')
    with pytest.raises(ValueError, match='sparsity_ratio'):
        HybridConfig(sparsity_ratio=1.5)
    with pytest.raises(ValueError, match='feature_map'):
        HybridConfig(feature_map='softmax')
    with pytest.raises(ValueError, match='frame_hw'):
        StreamState(StreamLayout(3, 4), HybridConfig(), (3, 3), VideoRope(12))


# ---------------------------------------------------------------------------------------------------- RoPE


def test_rope_depends_only_on_relative_frame_distance():
    rope = VideoRope(12)
    q, k = torch.randn(2, 1, 6, 1, 12, dtype=torch.float64).unbind(0)
    dots = [(rope.apply(q, [a], 2, 3) * rope.apply(k, [a - 4], 2, 3)).sum().item() for a in (4, 9, 20, -3)]
    assert max(dots) - min(dots) < 1e-12
    assert abs((rope.apply(q, [4], 2, 3) * rope.apply(k, [3], 2, 3)).sum().item() - dots[0]) > 1e-6
    with pytest.raises(ValueError, match='tokens'):
        rope.apply(q, [0, 1], 2, 3)


# ---------------------------------------------------------------------------------------------------- memory


def test_memory_running_means_equal_closed_form_and_stay_float32():
    torch.manual_seed(0)
    mem = LinearMemory(2, 3, 8, 5)
    ks, vs = [], []
    for s in (4, 7, 1, 12):
        k, v = torch.randn(2, s, 3, 8, dtype=torch.bfloat16).relu(), torch.randn(2, s, 3, 5, dtype=torch.bfloat16)
        mem.absorb(k, k, v)
        ks.append(k.double()), vs.append(v.double())
    k, v = torch.cat(ks, 1), torch.cat(vs, 1)
    assert mem.z.dtype == mem.M.dtype == torch.float32 and mem.count.item() == 24
    torch.testing.assert_close(mem.z.double(), k.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mem.M.double(), torch.einsum('bshk,bshv->bhkv', k, v) / 24, rtol=1e-6, atol=1e-6)
    q = torch.randn(2, 6, 3, 8, dtype=torch.bfloat16).relu()
    ref = torch.einsum('bshk,bthk,bthv->bshv', q.double(), k, v) / (
        torch.einsum('bshk,bthk->bsh', q.double(), k)[..., None] + 24e-6)
    assert mem.read(q, q).dtype == torch.bfloat16
    assert rel_rms_error(mem.read(q, q).double(), ref) < 5e-3


def test_memory_state_stays_exact_over_a_long_stream():
    """Ten thousand absorptions of bf16 chunks: the float32 running means track a float64 recomputation."""
    torch.manual_seed(1)
    mem = LinearMemory(1, 2, 4, 4)
    z64, M64, count = torch.zeros(1, 2, 4, dtype=torch.float64), torch.zeros(1, 2, 4, 4, dtype=torch.float64), 0
    for _ in range(10000):
        k = torch.rand(1, 6, 2, 4).to(torch.bfloat16)
        v = torch.randn(1, 6, 2, 4).to(torch.bfloat16)
        mem.absorb(k, k, v)
        z64 = (count * z64 + k.double().sum(1)) / (count + 6)
        M64 = (count * M64 + torch.einsum('bshk,bshv->bhkv', k.double(), v.double())) / (count + 6)
        count += 6
    assert mem.count.item() == count
    assert rel_rms_error(mem.z.double(), z64) < 1e-5 and rel_rms_error(mem.M.double(), M64) < 1e-4


def test_chunked_readout_equals_absorbing_chunk_by_chunk():
    torch.manual_seed(2)
    layout = StreamLayout(1, 3, sink_chunks=1, window_chunks=1)
    n, T = 6, layout.chunk_tokens
    q, k = torch.rand(2, 1, n * T, 2, 4, dtype=torch.float64).unbind(0)
    v = torch.randn(1, n * T, 2, 4, dtype=torch.float64)
    out = memory_readout_chunked(q, k, v, [layout.absorbed(c) for c in range(n)], T)
    mem = LinearMemory(1, 2, 4, 4, state_dtype=torch.float64)
    for c in range(n):
        sl = slice(c * T, (c + 1) * T)
        assert rel_rms_error(out[:, sl], mem.read(q[:, sl], q[:, sl])) < 1e-12 or c < 2
        gone = layout.evicted(c)
        if gone is not None:
            g = slice(gone * T, (gone + 1) * T)
            mem.absorb(k[:, g], k[:, g], v[:, g])
    assert out[:, :2 * T].abs().max() == 0  # nothing evicted before chunk 2


@pytest.mark.parametrize('case', ['hybrid_forcing_linear_memory_3evict', 'hybrid_forcing_linear_memory_7evict_ropecap'])
def test_hybrid_forcing_memory_schedule_matches_the_original(case):
    path = PARITY / 'kernels' / f'{case}.pt'
    if not path.exists():
        pytest.skip(f'parity fixture {path} not found (set VISIONMIX_PARITY_DIR)')
    case = torch.load(path, weights_only=True)
    p, inp, out = case['params'], case['inputs'], case['outputs']
    d, (h, w) = p['head_dim'], p['frame_hw']
    rope = VideoRope(d)
    table = inp['rope_freqs'].double()  # [1024, d / 2, (cos, sin)], axis tables side by side
    nt, nh, _ = rope.split
    for sl, (fr, hh, ww) in ((slice(0, nt), (range(1024), 1, 1)), (slice(nt, nt + nh), ([0], 1024, 1)),
                             (slice(nt + nh, None), ([0], 1, 1024))):
        cos, sin = rope.cos_sin(fr, hh, ww, dtype=torch.float64)
        assert (cos[:, sl] - table[:, sl, 0]).abs().max() < 1e-6 and (sin[:, sl] - table[:, sl, 1]).abs().max() < 1e-6
    layout = StreamLayout(p['frames_per_chunk'], h * w, sink_chunks=1, window_chunks=1,
                          rope_frame_cap=p['q_rope_frame_cap'])
    state = StreamState(layout, HybridConfig(memory_mode='hybrid_forcing', feature_map=p['kernel_func'],
                                             eps=p['eps']), (h, w), rope)
    cache = state.add_layer(p['batch'], p['heads'], d, dtype=torch.float64)
    proj = torch.nn.Linear(d, d).double()
    proj.weight.data, proj.bias.data = inp['linear_proj_weight'].double(), inp['linear_proj_bias'].double()
    for c in range(p['num_chunks']):
        _, mem, active = cache.attend(inp['q'][c].double(), inp['k_cached'][c].double(), inp['v_cached'][c].double())
        readout = proj(mem) * active
        assert rel_rms_error(readout, out['readout'][c]) < 1e-12 if c >= 2 else readout.abs().max() == 0
        state.commit()
        if 1 <= c < p['num_chunks'] - 1:  # absorption i happens before chunk i + 2
            i = c - 1
            assert cache.memory.count.item() == out['N'][i].item()
            assert rel_rms_error(cache.memory.z, out['z'][i][..., 0]) < 1e-12
            assert rel_rms_error(cache.memory.M, out['M'][i]) < 1e-12


# ---------------------------------------------------------------------------------------------------- attention


def test_sparse_ratio_one_equals_dense_on_the_block_sparse_kernel():
    torch.manual_seed(3)
    q = torch.randn(2, 20, 2, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 44, 2, 8, dtype=torch.float64).unbind(0)
    dense = window_attention(q, k, v)
    sparse = window_attention(q, k, v, sparsity_ratio=1.0, block_size=8, backend='torch')
    assert rel_rms_error(sparse, dense) < 1e-12
    mask = torch.rand(2, 44) > 0.3
    assert rel_rms_error(window_attention(q, k, v, mask, 1.0, 8, 'torch'), window_attention(q, k, v, mask)) < 1e-12
    assert rel_rms_error(window_attention(q, k, v, sparsity_ratio=0.5, block_size=8, backend='torch'), dense) > 1e-3


def test_sparse_window_attention_on_the_triton_kernel():
    pytest.importorskip('triton')
    if not (torch.cuda.is_available() or os.environ.get('TRITON_INTERPRET') == '1'):
        pytest.skip('needs CUDA or TRITON_INTERPRET=1')
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, n, 2, 16, device=device) for n in (24, 40, 40))
    for ratio in (1.0, 0.4):
        ref = window_attention(q, k, v, sparsity_ratio=ratio, block_size=16, backend='torch')
        out = window_attention(q, k, v, sparsity_ratio=ratio, block_size=16, backend='triton')
        assert rel_rms_error(out, ref) < 1e-5
    assert rel_rms_error(window_attention(q, k, v, sparsity_ratio=1.0, block_size=16, backend='triton'),
                         window_attention(q, k, v)) < 1e-5


def test_top_k_keeps_the_best_scoring_blocks():
    torch.manual_seed(5)
    q, k = torch.randn(2, 1, 32, 1, 4).unbind(0)
    idx, num = select_key_blocks(q, k, 0.5, 8)
    assert idx.shape == (1, 1, 4, 2) and (num == 2).all()
    pq = q.reshape(1, 4, 8, 4).mean(2)
    pk = (k - k.mean(1, keepdim=True)).reshape(1, 4, 8, 4).mean(2)
    best = (pq[0] @ pk[0].T).topk(2, -1).indices
    assert torch.equal(idx[0, 0].sort(-1).values, best.sort(-1).values.int())
    with pytest.raises(ValueError, match='ratio'):
        select_key_blocks(q, k, 0.0, 8)
    with pytest.raises(ValueError, match='block_size'):
        window_attention(q, k, k, sparsity_ratio=0.5, block_size=0)


# ---------------------------------------------------------------------------------------------------- engine


SETUPS = {
    'window+memory': (StreamLayout(3, 4, 1, 2, rope_frame_cap=9), HybridConfig()),
    'window+memory+sparse': (StreamLayout(3, 4, 1, 1, rope_frame_cap=6),
                             HybridConfig(feature_map='elu1', sparsity_ratio=0.5, block_size=8)),
    'dense': (StreamLayout(3, 4, 1, None, max_chunks=7), HybridConfig(memory=False)),
}


@pytest.mark.parametrize('name', list(SETUPS))
def test_training_path_equals_streaming(name):
    """forward_clip (all chunks at once, teacher forcing) == streaming the clean chunks and denoising each."""
    layout, config = SETUPS[name]
    model = tiny_model()
    n = 7
    clean, noisy = torch.randn(2, 2, 3, 3 * n, 8, 8, dtype=torch.float64).unbind(0)
    sigma = torch.rand(2, n, dtype=torch.float64)
    ref = model.forward_clip(clean, noisy, sigma, layout, config)
    state = model.new_state(layout, config, 2, dtype=torch.float64)
    with torch.no_grad():
        for c in range(n):
            sl = slice(3 * c, 3 * c + 3)
            assert rel_rms_error(model.forward_chunk(noisy[:, :, sl], sigma[:, c], state), ref[:, :, sl]) < 1e-12
            model.forward_chunk(clean[:, :, sl], torch.zeros(2, dtype=torch.float64), state)
            state.commit()


def make_generator(model, layout, config, batch=1):
    state = model.new_state(layout, config, batch, dtype=torch.float64)
    return StreamingGenerator(model.forward_chunk, state, (batch, 3, 3, 8, 8), dtype=torch.float64)


def test_generating_in_pieces_equals_one_call():
    layout, config = SETUPS['window+memory+sparse']
    model = tiny_model(1)
    prime = torch.randn(1, 3, 6, 8, 8, dtype=torch.float64)
    whole = torch.cat(list(make_generator(model, layout, config).generate(
        9, prime=prime, generator=torch.Generator().manual_seed(0))), 2)
    gen, rng = make_generator(model, layout, config), torch.Generator().manual_seed(0)
    pieces = list(gen.generate(4, prime=prime, generator=rng)) + list(gen.generate(5, generator=rng))
    assert torch.equal(torch.cat(pieces, 2), whole)
    assert torch.equal(whole[:, :, :6], prime)


def test_reset_state_streams_like_a_fresh_one():
    layout, config = SETUPS['window+memory+sparse']
    model = tiny_model(6)
    gen = make_generator(model, layout, config)
    first = torch.cat(list(gen.generate(6, generator=torch.Generator().manual_seed(0))), 2)
    gen.state.reset()
    assert gen.state.chunk == 0 and all(c.memory.count.item() == 0 for c in gen.state.layers)
    again = torch.cat(list(gen.generate(6, generator=torch.Generator().manual_seed(0))), 2)
    assert torch.equal(first, again)


def test_steady_needs_positions_that_stop_moving():
    model = tiny_model()
    capped = make_generator(model, StreamLayout(3, 4, 1, 1, rope_frame_cap=9), HybridConfig())
    uncapped = make_generator(model, StreamLayout(3, 4, 1, 1), HybridConfig())
    no_sink = make_generator(model, StreamLayout(3, 4, 0, 2), HybridConfig())
    steady = {}
    for name, gen in (('capped', capped), ('uncapped', uncapped), ('no_sink', no_sink)):
        steady[name] = []
        for _ in range(5):
            steady[name].append(gen.steady())
            gen.state.chunk += 1
    assert steady['capped'] == [False, False, False, True, True]  # window full at 3, query at the cap from 3
    assert steady['uncapped'] == [False] * 5  # the sink's absolute distance keeps growing
    assert steady['no_sink'] == [False, False, False, True, True]  # only relative positions matter


def test_denoising_steps_overwrite_the_chunk_slots_and_the_clean_pass_stays():
    layout, config = SETUPS['window+memory']
    model = tiny_model(2)
    gen = make_generator(model, layout, config)
    x0 = gen.denoise_chunk(gen.sample_noise(torch.Generator().manual_seed(1)))
    gen.encode_clean(x0)
    after_first = [c.k[:, :12].clone() for c in gen.state.layers]
    fresh = make_generator(model, layout, config)
    fresh.encode_clean(x0)  # only the clean pass: the same cache
    for a, cache in zip(after_first, fresh.state.layers):
        assert torch.equal(a, cache.k[:, :12])
    assert gen.state.chunk == 1


def test_state_is_flat_and_evictions_are_absorbed_once_over_a_long_stream():
    layout, config = SETUPS['window+memory+sparse']
    model = tiny_model(3)
    gen = make_generator(model, layout, config)
    gen.sigmas = torch.tensor([1.0])
    nbytes, ptrs = gen.state.nbytes(), [t.data_ptr() for t in gen.state.tensors()]
    rng = torch.Generator().manual_seed(0)
    for c, chunk in enumerate(gen.generate(60, generator=rng)):
        assert torch.isfinite(chunk).all()
        absorbed = len(layout.absorbed(c + 1))
        assert all(cache.memory.count.item() == absorbed * layout.chunk_tokens for cache in gen.state.layers)
    assert gen.state.nbytes() == nbytes and [t.data_ptr() for t in gen.state.tensors()] == ptrs
    assert gen.state.layers[0].memory.z.dtype == torch.float64  # float64 activations keep float64 state


class _HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.syncs.append(func)
        return func(*args, **(kwargs or {}))


def test_steady_chunk_step_has_no_host_sync():
    """What a CUDA graph capture needs: a steady step reads nothing back to the host and allocates no new state."""
    layout, config = SETUPS['window+memory+sparse']
    model = tiny_model(4).float()
    state = model.new_state(layout, config, 1)
    gen = StreamingGenerator(model.forward_chunk, state, (1, 3, 3, 8, 8))
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(4):
            gen.step(gen.sample_noise(rng))
        assert gen.steady()
        noise = gen.sample_noise(rng)
        with _HostSyncs() as mode:
            gen.step(noise)
    assert mode.syncs == []


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager():
    layout, config = SETUPS['window+memory+sparse']
    model = tiny_model(5).float().cuda()
    outs = []
    for graph in (False, True):
        state = model.new_state(layout, config, 1, device='cuda')
        gen = StreamingGenerator(model.forward_chunk, state, (1, 3, 3, 8, 8), device='cuda')
        outs.append(torch.cat(list(gen.generate(12, generator=torch.Generator('cuda').manual_seed(0),
                                                use_cuda_graph=graph)), 2))
    assert gen._graph is not None
    assert rel_rms_error(outs[1], outs[0]) < 1e-5


def test_sigmas_and_chunk_arguments_are_checked():
    assert torch.allclose(shifted_sigmas((1000, 500), shift=1.0), torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match='steps'):
        shifted_sigmas((0,))
    model = tiny_model()
    layout, config = SETUPS['window+memory']
    state = model.new_state(layout, config, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match='one chunk'):
        model.forward_chunk(torch.zeros(1, 3, 6, 8, 8, dtype=torch.float64), torch.zeros(1), state)
    with pytest.raises(ValueError, match='prime'):
        next(make_generator(model, layout, config).generate(2, prime=torch.zeros(1, 3, 4, 8, 8)))
    with pytest.raises(ValueError, match='tokens_per_frame'):
        model.new_state(StreamLayout(3, 5), config, 1)
    with pytest.raises(ValueError, match='use_cuda_graph'):
        next(make_generator(model, layout, config).generate(2, use_cuda_graph=True))
