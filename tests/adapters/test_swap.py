"""swap_attention(model, 'grat'): timm ViTs with GRAT attention, weights untouched."""
import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import visionmix
from visionmix.adapters import GratViTAttention, set_grat_grid
from visionmix.layers.grat import grat_dense_mask


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _vit(**kwargs):
    torch.manual_seed(0)
    args = dict(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2, num_classes=10)
    return VisionTransformer(**{**args, **kwargs}).eval()


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize('extra', [{}, dict(reg_tokens=2, qk_norm=True), dict(class_token=False, global_pool='avg')],
                         ids=['cls', 'cls+reg+qknorm', 'no-prefix'])
def test_full_coverage_equals_original(dtype, tol, extra):
    dense = _vit(**extra).to(dtype)
    grat = visionmix.swap_attention(copy.deepcopy(dense), 'grat', group_size=2, mode='B', radius=3)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        assert _rel(grat(x), dense(x)) < tol
        assert _rel(grat.forward_features(x), dense.forward_features(x)) < tol


@pytest.mark.parametrize('options', [dict(group_size=2, mode='X'), dict(group_size=(2, 4), mode='B', radius=1),
                                     dict(group_size=4, mode='X', blocks=[0, -1])])
def test_sparse_equals_masked_dense(options):
    dense = _vit(reg_tokens=1)
    grat = visionmix.swap_attention(copy.deepcopy(dense), 'grat', **options)
    prefix = dense.num_prefix_tokens
    mask = grat_dense_mask((8, 8), options['group_size'], options['mode'], options.get('radius', 1),
                           text_tokens=prefix, text_first=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = grat.forward_features(x)
        if 'blocks' in options:  # only the chosen blocks are masked
            ref = dense.norm_pre(dense.patch_drop(dense._pos_embed(dense.patch_embed(x))))
            for i, block in enumerate(dense.blocks):
                ref = block(ref, attn_mask=mask if i in (0, len(dense.blocks) - 1) else None)
            ref = dense.norm(ref)
            assert not isinstance(grat.blocks[1].attn, GratViTAttention)
        else:
            ref = dense.forward_features(x, attn_mask=mask)
        assert _rel(got, ref) < 1e-5
        assert _rel(got, dense.forward_features(x)) > 1e-3  # the pattern is sparse


def test_weights_untouched():
    dense = _vit()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    qkv = dense.blocks[0].attn.qkv
    visionmix.swap_attention(dense, 'grat')
    assert dense.blocks[0].attn.qkv is qkv
    after = dense.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_backward_and_torchscript():
    model = visionmix.swap_attention(_vit(), 'grat', group_size=2, mode='X')
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert _rel(scripted(x), model(x)) < 1e-6


def test_other_input_sizes():
    model = timm.create_model('test_vit', pretrained=False).eval()  # dynamic_img_size, 10x10 grid at 160 px
    visionmix.swap_attention(model, 'grat', group_size=2, mode='B')
    dense = timm.create_model('test_vit', pretrained=False).eval()
    dense.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 96, 96)  # 6x6: the grid of the same aspect ratio
    mask = grat_dense_mask((6, 6), 2, 'B', 1, text_tokens=1, text_first=True)
    with torch.no_grad():
        assert _rel(model.forward_features(x), dense.forward_features(x, attn_mask=mask)) < 1e-5
        x = torch.randn(1, 3, 64, 96)  # 4x6: cannot be told from 24 tokens
        with pytest.raises(ValueError, match='set_grat_grid'):
            model(x)
        set_grat_grid(model, (4, 6))
        mask = grat_dense_mask((4, 6), 2, 'B', 1, text_tokens=1, text_first=True)
        assert _rel(model.forward_features(x), dense.forward_features(x, attn_mask=mask)) < 1e-5


def test_reswap_changes_pattern():
    model = visionmix.swap_attention(_vit(), 'grat', group_size=2, mode='X')
    visionmix.swap_attention(model, 'grat', group_size=4, mode='B', radius=0)
    attn = model.blocks[2].attn
    assert isinstance(attn, GratViTAttention) and attn.group_size == (4, 4) and attn.mode == 'B'


def test_bad_use():
    with pytest.raises(ValueError, match='divisible'):
        visionmix.swap_attention(_vit(), 'grat', group_size=3)
    with pytest.raises(ValueError, match='kind'):
        visionmix.swap_attention(_vit(), 'nope')
    with pytest.raises(ValueError, match='VisionTransformer'):
        visionmix.swap_attention(torch.nn.Linear(2, 2), 'grat')
    with pytest.raises(ValueError, match='dropout'):
        visionmix.swap_attention(_vit(attn_drop_rate=0.1), 'grat')
    model = visionmix.swap_attention(_vit(), 'grat')
    with pytest.raises(ValueError, match='attn_mask'):
        model.forward_features(torch.randn(1, 3, 64, 64), attn_mask=torch.ones(65, 65, dtype=torch.bool))
