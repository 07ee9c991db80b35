"""GRAT processors on tiny randomly initialised Flux and HunyuanVideo transformers."""
import pytest
import torch

pytest.importorskip('diffusers', reason='diffusers is not installed (pip install visionmix[diffusion])')

from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor  # noqa: E402
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0  # noqa: E402

from visionmix.adapters.diffusers_grat import (  # noqa: E402
    FluxGratAttnProcessor,
    HunyuanVideoGratAttnProcessor,
    apply_grat,
)
from visionmix.layers.grat import grat_dense_mask  # noqa: E402

B, TEXT = 2, 7


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).eval()


def _flux_inputs(height=8, width=12, timestep=0.5):
    torch.manual_seed(1)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None]
    return dict(hidden_states=torch.randn(B, height * width, 4), encoder_hidden_states=torch.randn(B, TEXT, 32),
                pooled_projections=torch.randn(B, 16), timestep=torch.full((B,), timestep),
                img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(TEXT, 3))


def _hunyuan():
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=16, rope_axes_dim=(4, 6, 6)).eval()


def _hunyuan_inputs(frames=4, height=8, width=16, timestep=500.):
    torch.manual_seed(1)
    prompt_mask = torch.ones(B, TEXT, dtype=torch.long)
    prompt_mask[1, 3:] = 0  # prompts of different lengths in one batch (as with classifier-free guidance)
    return dict(hidden_states=torch.randn(B, 4, frames, height, width), timestep=torch.full((B,), timestep),
                encoder_hidden_states=torch.randn(B, TEXT, 32), encoder_attention_mask=prompt_mask,
                pooled_projections=torch.randn(B, 16), guidance=torch.full((B,), 3000.))


class MaskedDense:
    """diffusers' own dense processor with the GRAT pattern as a boolean mask (the dense masked reference)."""

    def __init__(self, dense, mask):
        self.dense, self.mask = dense, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        mask = self.mask[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.reshape(attention_mask.shape[0], 1, 1, -1)
        return self.dense(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def _set_reference(model, dense_cls, mask, names=None):
    for name, module in model.named_modules():
        if name.startswith(('transformer_blocks.', 'single_transformer_blocks.')) and name.count('.') == 1:
            if names is None or name in names:
                module.attn.set_processor(MaskedDense(dense_cls(), mask))


CASES = {
    'flux': (_flux, _flux_inputs, FluxAttnProcessor, (8, 12), True),
    'hunyuan': (_hunyuan, _hunyuan_inputs, HunyuanVideoAttnProcessor2_0, (4, 4, 8), False),
}


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize('kind', CASES)
def test_full_coverage_equals_dense(kind, dtype, tol):
    make, inputs, _, grid, _ = CASES[kind]
    model = make().to(dtype)
    args = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs().items()}
    dense = _run(model, args)
    handle = apply_grat(model, group_size=2, mode='B', radius=8)
    assert _rel(_run(model, args), dense) < tol
    assert all(proc.grid == grid for proc in handle.processors.values())  # read from the inputs
    handle.remove()
    assert torch.equal(_run(model, args), dense)


@pytest.mark.parametrize('options', [dict(group_size=2, mode='X'), dict(group_size=(2, 4), mode='B', radius=1)],
                         ids=['X', 'B'])
@pytest.mark.parametrize('kind', CASES)
def test_sparse_equals_masked_dense(kind, options):
    make, inputs, dense_cls, grid, text_first = CASES[kind]
    group_size = options['group_size']
    if len(grid) == 3:
        group_size = (2, 2, 2) if group_size == 2 else (1,) + group_size
    options = {**options, 'group_size': group_size}
    model = make()
    dense = _run(model, inputs())
    apply_grat(model, **options)
    got = _run(model, inputs())
    mask = grat_dense_mask(grid, group_size, options['mode'], options.get('radius', 1), text_tokens=TEXT,
                           text_first=text_first)
    _set_reference(model, dense_cls, mask)
    ref = _run(model, inputs())
    assert _rel(got, ref) < 1e-5
    assert _rel(got, dense) > 1e-3  # the pattern is sparse


def test_flux_attenable_text():
    """Flux's dense baseline attends to padding T5 tokens; attenable_text hides them as the HunyuanVideo code does."""
    model = _flux()
    apply_grat(model, group_size=4, mode='X', attenable_text=4)
    got = _run(model, _flux_inputs())
    mask = grat_dense_mask((8, 12), 4, 'X', text_tokens=TEXT, text_first=True, attenable_text=4)
    _set_reference(model, FluxAttnProcessor, mask)
    assert _rel(got, _run(model, _flux_inputs())) < 1e-5


def test_hunyuan_keeps_token_refiner_and_layer_choice():
    model = _hunyuan()
    handle = apply_grat(model, group_size=(2, 2, 4), layers=[0, 3])
    assert list(handle.processors) == ['transformer_blocks.0', 'single_transformer_blocks.1']
    assert not isinstance(model.context_embedder.token_refiner.refiner_blocks[0].attn.processor,
                          HunyuanVideoGratAttnProcessor)
    assert isinstance(model.transformer_blocks[1].attn.processor, HunyuanVideoAttnProcessor2_0)
    got = _run(model, _hunyuan_inputs())
    mask = grat_dense_mask((4, 4, 8), (2, 2, 4), 'X', text_tokens=TEXT, text_first=False)
    _set_reference(model, HunyuanVideoAttnProcessor2_0, mask, names={'transformer_blocks.0',
                                                                     'single_transformer_blocks.1'})
    assert _rel(got, _run(model, _hunyuan_inputs())) < 1e-5


def test_timestep_schedule():
    model = _flux()
    dense_early, dense_late = _run(model, _flux_inputs(timestep=0.9)), _run(model, _flux_inputs(timestep=0.5))
    apply_grat(model, group_size=4, mode='B', radius=0, timesteps=lambda t: t < 0.75)
    assert torch.equal(_run(model, _flux_inputs(timestep=0.9)), dense_early)  # noisiest steps stay dense
    sparse_late = _run(model, _flux_inputs(timestep=0.5))
    assert _rel(sparse_late, dense_late) > 1e-3
    handle = apply_grat(model, group_size=4, mode='B', radius=0)  # every step; replaces the first call
    assert not torch.equal(_run(model, _flux_inputs(timestep=0.9)), dense_early)
    assert torch.equal(_run(model, _flux_inputs(timestep=0.5)), sparse_late)
    handle.remove()
    assert isinstance(model.transformer_blocks[0].attn.processor, FluxAttnProcessor)
    assert torch.equal(_run(model, _flux_inputs(timestep=0.9)), dense_early)


def test_grid_follows_resolution():
    model = _hunyuan()
    handle = apply_grat(model, group_size=(2, 2, 2))
    _run(model, _hunyuan_inputs(frames=2, height=8, width=8))
    assert handle.processors['transformer_blocks.0'].grid == (2, 4, 4)
    with pytest.raises(ValueError, match='divisible'):
        _run(model, _hunyuan_inputs(frames=3, height=8, width=8))


def test_standalone_processor_and_bad_input():
    model = _flux()
    proc = FluxGratAttnProcessor(group_size=4)
    model.set_attn_processor(proc)
    with pytest.raises(ValueError, match='grid'):
        _run(model, _flux_inputs())
    proc.set_grid((8, 12))
    _run(model, _flux_inputs())
    with pytest.raises(ValueError, match='divisible'):
        proc.set_grid((8, 10))
    attn = model.transformer_blocks[0].attn
    with pytest.raises(ValueError, match='boolean key mask'):
        proc(attn, torch.randn(1, 96, 32), torch.randn(1, TEXT, 32), attention_mask=torch.zeros(1, 1, 103, 103))
    with pytest.raises(ValueError, match='supports'):
        apply_grat(torch.nn.Linear(2, 2))
    assert HunyuanVideoGratAttnProcessor().group_size == (4, 8, 8)
