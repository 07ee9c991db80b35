"""Registered timm ViT/DeiT + GRAT variants: base weights load unchanged, full coverage equals the base model."""
import pytest
import timm
import torch

import visionmix  # noqa: F401
from visionmix.adapters import GratViTAttention
from visionmix.layers.grat import grat_dense_mask

BASES = {
    'vit_base_patch16_224_grat': 'vit_base_patch16_224.augreg2_in21k_ft_in1k',
    'deit_small_patch16_224_grat': 'deit_small_patch16_224.fb_in1k',
    'test_vit_grat': 'test_vit',
}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize('name', BASES)
def test_same_weights_as_base(name):
    model = timm.create_model(name, device='meta')
    base = timm.create_model(BASES[name], device='meta')
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    assert all(isinstance(block.attn, GratViTAttention) for block in model.blocks)
    if name != 'test_vit_grat':
        cfg, base_cfg = model.pretrained_cfg, base.pretrained_cfg
        assert cfg['hf_hub_id'] == base_cfg['hf_hub_id']  # timm's own weights of the base model
        for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation'):
            assert cfg[key] == base_cfg[key]


def test_full_coverage_equals_base():
    base = timm.create_model('test_vit').eval()
    model = timm.create_model('test_vit_grat', grat_radius=4).eval()  # 5x5 groups at 160 px: every group
    model.load_state_dict(base.state_dict())
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert _rel(model(x), base(x)) < 1e-6


def test_default_pattern_equals_masked_base():
    base = timm.create_model('test_vit').eval()
    model = timm.create_model('test_vit_grat').eval()
    model.load_state_dict(base.state_dict())
    x = torch.randn(1, 3, 160, 160)
    mask = grat_dense_mask((10, 10), 2, 'B', 1, text_tokens=1, text_first=True)
    with torch.no_grad():
        assert _rel(model.forward_features(x), base.forward_features(x, attn_mask=mask)) < 1e-5


def test_create_model_options_and_features():
    model = timm.create_model('deit_small_patch16_224_grat', grat_mode='B', grat_group_size=7, grat_radius=0,
                              grat_blocks=[0], device='meta')
    assert isinstance(model.blocks[0].attn, GratViTAttention) and model.blocks[0].attn.group_size == (7, 7)
    assert not isinstance(model.blocks[1].attn, GratViTAttention)
    features = timm.create_model('test_vit_grat', features_only=True, out_indices=(2, 5)).eval()
    with torch.no_grad():
        outs = features(torch.randn(1, 3, 160, 160))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 10, 10)] * 2
