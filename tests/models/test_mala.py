"""MAViT (MALA) / RAVLT (RALA): parity with the original code, converter on the released layouts, timm contract,
bad input."""
import argparse
import json

import pytest
import timm
import torch

import visionmix  # noqa: F401
from tests.conftest import parity_dir, parity_error, parity_files
from visionmix.convert import build_from_official
from visionmix.models.mala import MALA, checkpoint_filter_fn, convert_official, rope_frequencies

RELEASED = {  # name -> parameter count of the original model (manifests in shared/parity)
    'mavit_tiny': 16_449_128, 'mavit_small': 27_142_568, 'mavit_base': 49_792_648, 'mavit_large': 97_766_088,
    'ravlt_tiny': 14_897_768, 'ravlt_small': 25_591_208, 'ravlt_base': 48_241_288, 'ravlt_large': 95_242_440,
}
MANIFEST_VARIANTS = {'MALA': 'mavit', 'RAVLT': 'ravlt'}
SIZES = {'T': 'tiny', 'S': 'small', 'B': 'base', 'L': 'large'}


def _my_module_name(name: str) -> str:
    """Fixture feature name (original module) -> module of :class:`MALA` computing the same tensor."""
    if name == 'patch_embed':
        return 'stem'
    parts = name.split('.')
    if parts[2] == 'downsample':
        return f'stages.{int(parts[1]) + 1}.downsample'
    return f"stages.{parts[1]}.blocks.{parts[3]}"


@pytest.mark.parametrize('path', parity_files('mala') + parity_files('rala'))
def test_parity_with_original(path):
    case = torch.load(path, weights_only=True)
    model = build_from_official(case['family'], case['official_class'], case['official_kwargs'],
                                case['state_dict']).double()
    x = case['input'].double()
    captured = {}
    modules = dict(model.named_modules())
    hooks = [modules[_my_module_name(n)].register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
             for n in case['feature_names']]
    with torch.no_grad():
        out = model(x)
        final, stages = model.forward_intermediates(x)
    for h in hooks:
        h.remove()
    assert parity_error(out, case['output']) < 1e-6
    assert len(case['features']) == len(case['feature_names']) > 0
    for name, ref in zip(case['feature_names'], case['features']):
        assert parity_error(captured[name], ref) < 1e-6, name
        if '.blocks.' in name:  # the stage output before downsampling is what forward_intermediates returns
            assert parity_error(stages[int(name.split('.')[1])], ref) < 1e-6, name
    assert torch.equal(final, model.forward_features(x))


def test_parity_features_cover_every_stage():
    path = parity_files('mala')[0].values[0]
    if path is None:
        pytest.skip('no parity fixtures')
    names = torch.load(path, weights_only=True)['feature_names']
    assert {int(n.split('.')[1]) for n in names if '.blocks.' in n} == {0, 1, 2, 3}


def _manifests():
    files = sorted(parity_dir().glob('mala/manifest_*.json')) + sorted(parity_dir().glob('rala/manifest_*.json'))
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f'no manifests under {parity_dir()}'))]
    return [pytest.param(f, id=f.stem.removeprefix('manifest_')) for f in files]


@pytest.mark.parametrize('path', _manifests())
def test_converter_accepts_released_layout(path):
    manifest = json.loads(path.read_text())
    family = 'mala' if manifest['variant'].startswith('MALA') else 'rala'
    with torch.device('meta'):
        state_dict = {k: torch.empty(shape) for k, shape in manifest['keys'].items()}
        released = {'model': state_dict, 'epoch': 299}  # the released files are training dicts
        model = build_from_official(family, manifest['official_class'], manifest['official_kwargs'], released)
    assert sum(p.numel() for p in model.parameters()) == manifest['num_params']
    # hybrid stages: the family's linear attention in stages 0-1, softmax in stages 2-3, as in the manifest
    linear = 'mala' if family == 'mala' else 'rala'
    for stage, classes in zip(model.stages, manifest['attention_per_block']):
        expected = [linear if c in ('AddLinearAttention', 'GateLinearAttentionNoSilu') else 'softmax' for c in classes]
        assert [b.attn.attn_type for b in stage.blocks] == expected
    # the registered variant builds the same architecture as the original factory
    cls, size = manifest['variant'].split('_')
    with torch.device('meta'):
        registered = timm.create_model(f'{MANIFEST_VARIANTS[cls]}_{SIZES[size]}')
    assert {k: v.shape for k, v in registered.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}
    assert [[b.attn.attn_type for b in s.blocks] for s in registered.stages] == [
        [b.attn.attn_type for b in s.blocks] for s in model.stages]


@pytest.mark.parametrize('name', sorted(RELEASED))
def test_registered_param_counts(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == RELEASED[name]


def test_registered_names_and_pretrained_cfgs():
    names = set(timm.list_models(module='mala'))
    assert set(RELEASED) | {'test_mavit', 'test_ravlt'} <= names
    pretrained = timm.list_pretrained('mavit_*') + timm.list_pretrained('ravlt_*')
    assert len(pretrained) == 8
    for name in pretrained:
        cfg = timm.models.get_pretrained_cfg(name)
        family = 'MAViT' if name.startswith('mavit') else 'RAVLT'
        size = {v: k for k, v in SIZES.items()}[name.split('.')[0].split('_')[1]]
        assert cfg.hf_hub_id == f'aldjalkdf/{family}' and cfg.hf_hub_filename == f'{family}_{size}.pth', name
        assert cfg.paper_ids == ('arXiv:2507.00698' if family == 'MAViT' else 'arXiv:2411.07635')
        assert cfg.first_conv == 'stem.0' and cfg.classifier == 'head.fc' and cfg.crop_pct == 0.875


def test_rope_tables():
    """Interleaved pairs; rows rotate the first half of a head, columns the second; float32 frequencies."""
    freq = rope_frequencies(16)
    assert freq.dtype == torch.float32 and torch.equal(freq[0::2], freq[1::2])
    assert freq[0] == 1 and abs(freq[-1].item() - 1e-4) < 1e-10
    rope = timm.create_model('test_mavit').stages[0].rope
    cos, sin = rope(3, 5, torch.float64, torch.device('cpu'))
    assert cos.shape == sin.shape == (15, 16)
    angle = torch.atan2(sin, cos)
    token = 2 * 5 + 1  # row 2, column 1
    torch.testing.assert_close(angle[token, :8], 2 * freq[:8].double())
    torch.testing.assert_close(angle[token, 8:], 1 * freq[:8].double())


def test_checkpoint_filter_on_training_dict():
    """The released training dict (weights under 'model', maybe 'module.'-prefixed) converts and loads strictly;
    a converted state_dict passes through; a RoPE buffer of the wrong head_dim is rejected."""
    path = parity_files('rala')[0].values[0]
    if path is None:
        pytest.skip('no parity fixtures')
    case = torch.load(path, weights_only=True)
    model_cls, kwargs, filter_fn = convert_official(case['official_class'], case['official_kwargs'])
    model = model_cls(**kwargs).double().eval()
    wrapped = {'model': {'module.' + k: v for k, v in case['state_dict'].items()}, 'optimizer': {}, 'epoch': 1}
    model.load_state_dict(filter_fn(wrapped, model), strict=True)
    with torch.no_grad():
        assert parity_error(model(case['input'].double()), case['output']) < 1e-6
    assert filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()
    bad = dict(case['state_dict'])
    bad['layers.0.RoPE.angle'] = torch.ones_like(bad['layers.0.RoPE.angle'])
    with pytest.raises(ValueError, match='RoPE'):
        checkpoint_filter_fn(bad, model)


def test_pretrained_loading_through_timm(tmp_path):
    """A released-style training dict (pickled argparse args, weights under 'model') loads through timm's
    pretrained path (custom_load -> load_pretrained; a local file needs custom_load=True in the overlay, timm
    resets it for a new source) and reproduces the original; another num_classes keeps all but the classifier."""
    path = parity_files('mala')[0].values[0]
    if path is None:
        pytest.skip('no parity fixtures')
    case = torch.load(path, weights_only=True)
    file = tmp_path / 'MAViT_reduced.pth'
    torch.save({'model': case['state_dict'], 'epoch': 299, 'args': argparse.Namespace(model='MALA_T', lr=1e-3)},
               file)
    kw = case['official_kwargs']
    arch = dict(embed_dims=kw['embed_dims'], depths=kw['depths'], num_heads=kw['num_heads'],
                ls_init_values=kw['layer_init_values'], head_proj_dim=kw['projection'])
    assert timm.models.get_pretrained_cfg('mavit_tiny.in1k').custom_load == 'hf'
    overlay = dict(file=str(file), custom_load=True)
    model = timm.create_model('mavit_tiny', pretrained=True, num_classes=kw['num_classes'], **arch,
                              pretrained_cfg_overlay=dict(overlay, num_classes=kw['num_classes'])).double().eval()
    with torch.no_grad():
        assert parity_error(model(case['input'].double()), case['output']) < 1e-6
    other = timm.create_model('mavit_tiny', pretrained=True, pretrained_cfg_overlay=overlay, num_classes=3, **arch)
    assert torch.equal(other.stem[0].weight, model.stem[0].weight.float())
    assert other.get_classifier().out_features == 3


@pytest.mark.parametrize('name', ['test_mavit', 'test_ravlt'])
def test_forward_backward_non_square(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.stages[0].blocks[0].attn.qkvo.weight.grad.abs().sum() > 0
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 2, 3)


@pytest.mark.parametrize('name', ['test_mavit', 'test_ravlt'])
def test_features_only_and_intermediates(name):
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=True).eval()
    x = torch.randn(1, 3, 64, 96)
    feats = model(x)
    assert [tuple(f.shape[2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert model.feature_info.channels() == [16, 32, 48, 64]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    torch.manual_seed(0)
    full = timm.create_model(name).eval()
    with torch.no_grad():
        final, inter = full.forward_intermediates(x, indices=(1, 3))
        assert [t.shape for t in inter] == [(1, 32, 8, 12), (1, 64, 2, 3)]
        torch.testing.assert_close(inter[0], feats[1])
        torch.testing.assert_close(final, full.forward_features(x))
    full.prune_intermediate_layers(indices=(0, 1), prune_norm=True)
    assert len(full.stages) == 2
    with torch.no_grad():
        torch.testing.assert_close(full.forward_features(x), feats[1])


def test_odd_input_size():
    model = timm.create_model('test_ravlt').eval()
    with torch.no_grad():
        out = model.forward_intermediates(torch.randn(1, 3, 45, 71), intermediates_only=True)
    assert [tuple(t.shape[2:]) for t in out] == [(12, 18), (6, 9), (3, 5), (2, 3)]


def test_timm_contract_pieces():
    model = timm.create_model('test_mavit', drop_path_rate=0.2)
    assert model.no_weight_decay() == set()
    assert model.group_matcher()['stem'] == r'^stem'
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    x = torch.randn(1, 3, 64, 64)
    model(x).sum().backward()
    assert model.stages[1].blocks[0].attn.qkvo.weight.grad is not None
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3
    model.reset_classifier(0, '')
    assert model(x).shape == (1, 128, 2, 2)
    # drop path rises linearly over all blocks: 0 ... 0.2
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, 'drop_prob') else 0. for s in model.stages for b in s.blocks]
    assert rates[0] == 0. and abs(rates[-1] - 0.2) < 1e-6


def test_autocast_bf16():
    model = timm.create_model('test_ravlt').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        out = model(x)
    with torch.no_grad():
        ref = model(x)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 5e-2


def test_bad_input():
    model = timm.create_model('test_mavit').eval()
    with pytest.raises(ValueError, match='NCHW'):
        model(torch.randn(2, 64, 64))
    with pytest.raises(ValueError, match='in_chans=3'):
        model(torch.randn(1, 64, 64, 3))  # NHWC
    with pytest.raises(ValueError, match='divisible by 4'):
        MALA(embed_dims=(20, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 3, 4))  # head_dim 10 in stage 0
    with pytest.raises(ValueError, match='divisible by its num_heads'):
        MALA(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 3, 3, 4))
    with pytest.raises(ValueError, match='attn_types'):
        MALA(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
             attn_types=('mala', 'linear', 'softmax', 'softmax'))
    with pytest.raises(ValueError, match='one value per stage'):
        MALA(embed_dims=(16, 32, 48), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))


def test_converter_rejects_bad_arguments():
    kwargs = dict(embed_dims=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4],
                  mlp_ratios=[3.5] * 4, projection=64)
    with pytest.raises(ValueError, match=r"does not know: \['window_size'\]"):
        build_from_official('mala', 'classfication_release/model.py:MALA', dict(kwargs, window_size=7))
    with pytest.raises(ValueError, match='official_class for mala/rala'):
        build_from_official('rala', 'models/swin.py:Swin', kwargs)
    with pytest.raises(ValueError, match=r"must give \['projection'\]"):
        build_from_official('rala', 'classfication/RALA.py:RAVLT',
                            {k: v for k, v in kwargs.items() if k != 'projection'})
    with pytest.raises(ValueError, match="'l' \\(linear\\) or 'v'"):
        build_from_official('rala', 'classfication/RALA.py:RAVLT', dict(kwargs, flagss=[['x'], ['l'], ['v'], ['v']]))
    # per-block flags are honoured; layerscales=False means no layer scale
    model = build_from_official('rala', 'classfication/RALA.py:RAVLT',
                                dict(kwargs, flagss=[['v'], ['l'], ['l'], ['v']], layerscales=[False] * 4))
    assert [s.blocks[0].attn.attn_type for s in model.stages] == ['softmax', 'rala', 'rala', 'softmax']
    assert model.stages[0].blocks[0].gamma_1 is None
