"""L²ViT: parity with the original code, converter on the released layouts, timm contract, bad input."""
import argparse
import json

import pytest
import timm
import torch

import visionmix  # noqa: F401
from tests.conftest import parity_dir, parity_error, parity_files
from visionmix.convert import build_from_official
from visionmix.models.l2vit import L2ViT, checkpoint_filter_fn, convert_official

VARIANTS = {  # manifest variant -> registered name
    'L2ViT_Tiny': 'l2vit_tiny', 'L2ViT_Small': 'l2vit_small', 'L2ViT_Base': 'l2vit_base',
    'L2ViT_Base_384': 'l2vit_base_384', 'L2ViT_Base_22k': 'l2vit_base',
}


def _case(pattern='l2vit_case1.pt'):
    path = next(iter(sorted((parity_dir() / 'l2vit').glob(pattern))), None)
    if path is None:
        pytest.skip(f'no parity fixtures at {parity_dir() / "l2vit"}')
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize('path', parity_files('l2vit'))
def test_parity_with_original(path):
    case = torch.load(path, weights_only=True)
    model = build_from_official(case['family'], case['official_class'], case['official_kwargs'],
                                case['state_dict']).double()
    x = case['input'].double()
    with torch.no_grad():
        out = model(x)
        final, stages = model.forward_intermediates(x, output_fmt='NHWC')
    assert parity_error(out, case['output']) < 1e-6
    assert case.get('features')
    for name, ref in zip(case['feature_names'], case['features']):
        # original features are token sequences (B, H*W, C) of each stage and of the final norm
        feat = final if name == 'norm' else stages[int(name.split('.')[1])]
        assert parity_error(feat.flatten(1, 2), ref) < 1e-6, name
    assert torch.equal(final, model.forward_features(x))


def _manifests():
    files = sorted(parity_dir().glob('l2vit/manifest_*.json'))
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f'no manifests under {parity_dir()}'))]
    return [pytest.param(f, id=f.stem.removeprefix('manifest_')) for f in files]


@pytest.mark.parametrize('path', _manifests())
def test_converter_accepts_released_layout(path):
    manifest = json.loads(path.read_text())
    dtypes = {'int64': torch.int64}
    with torch.device('meta'):
        state_dict = {k: torch.empty(shape, dtype=dtypes.get(manifest['non_float_keys'].get(k), torch.float32))
                      for k, shape in manifest['keys'].items()}
        # released files are training dicts with the weights under 'model'
        model = build_from_official('l2vit', manifest['official_class'], manifest['official_kwargs'],
                                    {'model': state_dict, 'epoch': 299})
    assert sum(p.numel() for p in model.parameters()) == manifest['num_params']
    num_classes = manifest['official_kwargs']['num_classes']
    with torch.device('meta'):
        registered = timm.create_model(VARIANTS[manifest['variant']], num_classes=num_classes)
    assert {k: v.shape for k, v in registered.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}
    assert registered.window_size == model.window_size == manifest['official_kwargs']['window_size']


def test_registered_names_and_pretrained_cfgs():
    names = set(timm.list_models(module='l2vit'))
    assert {'l2vit_tiny', 'l2vit_small', 'l2vit_base', 'l2vit_base_384', 'test_l2vit'} <= names
    pretrained = set(timm.list_pretrained('l2vit*'))
    assert {'l2vit_tiny.in1k', 'l2vit_small.in1k', 'l2vit_base.in1k', 'l2vit_base.in22k_ft_in1k',
            'l2vit_base.in22k', 'l2vit_base_384.in22k_ft_in1k'} <= pretrained
    for name in pretrained:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url.startswith('https://github.com/ChuanyangZheng/L2ViT/releases/download/v1.0/L2ViT-'), name
        assert cfg.license == 'mit' and cfg.paper_ids == 'arXiv:2501.16182'
        assert cfg.interpolation == 'bicubic'
    assert timm.models.get_pretrained_cfg('l2vit_base.in22k').num_classes == 21841
    cfg384 = timm.models.get_pretrained_cfg('l2vit_base_384.in22k_ft_in1k')
    assert cfg384.input_size == (3, 384, 384) and cfg384.crop_pct == 1.0 and cfg384.crop_mode == 'squash'
    assert timm.models.get_pretrained_cfg('l2vit_tiny.in1k').crop_pct == 0.875


def test_pretrained_loading_through_timm(tmp_path):
    """A released-style training dict loads through timm's pretrained path and reproduces the original.

    The cfgs set custom_load (the files pickle argparse arguments, which timm's weights_only loader refuses);
    a local copy needs custom_load=True in the overlay, as for any original-format file. 'model' is used, not
    'model_ema'."""
    case = _case()
    path = tmp_path / 'l2vit_original.pth'
    ema = {k: torch.zeros_like(v) for k, v in case['state_dict'].items()}
    # the release files are training dicts that also pickle the argparse arguments
    torch.save({'model': case['state_dict'], 'model_ema': ema, 'epoch': 299,
                'args': argparse.Namespace(model='L2ViT_Tiny', input_size=224)}, path)
    kw = case['official_kwargs']
    overlay = dict(file=str(path), num_classes=kw['num_classes'], custom_load=True)
    model = timm.create_model(
        'l2vit_tiny', pretrained=True, pretrained_cfg_overlay=overlay,
        dims=kw['dims'], depths=kw['depths'], num_heads=kw['num_heads'], window_size=kw['window_size'],
        num_classes=kw['num_classes']).double().eval()
    with torch.no_grad():
        assert parity_error(model(case['input'].double()), case['output']) < 1e-6
    # another num_classes keeps everything but the classifier
    other = timm.create_model(
        'l2vit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), custom_load=True),
        dims=kw['dims'], depths=kw['depths'], num_heads=kw['num_heads'], num_classes=3)
    assert torch.equal(other.stem.conv1.weight, model.stem.conv1.weight.float())
    assert other.get_classifier().out_features == 3
    headless = timm.create_model(  # no classifier at all: the released one is dropped
        'l2vit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), custom_load=True),
        dims=kw['dims'], depths=kw['depths'], num_heads=kw['num_heads'], num_classes=0)
    assert torch.equal(headless.stem.conv1.weight, model.stem.conv1.weight.float())
    # loading an already-converted state dict is a no-op; 'module.' prefixes are stripped
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()
    prefixed = {'module.' + k: v for k, v in case['state_dict'].items()}
    assert checkpoint_filter_fn(prefixed, model).keys() == model.state_dict().keys()


def test_forward_backward_non_square():
    torch.manual_seed(0)
    model = timm.create_model('test_l2vit', num_classes=7)
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.stages[0].blocks[1].attn.temperature.grad.abs().sum() > 0
    feats = model.forward_features(x)
    assert feats.shape == (2, 2, 3, model.num_features)  # NHWC, stride 32


def test_odd_input_sizes_pad_like_the_original():
    model = timm.create_model('test_l2vit').eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, 45, 77), intermediates_only=True)
    # stem pads to 48x80 -> 12x20; each downsampler pads odd maps: 6x10, 3x5, 2x3
    assert [tuple(f.shape[-2:]) for f in feats] == [(12, 20), (6, 10), (3, 5), (2, 3)]


def test_features_only_and_intermediates():
    model = timm.create_model('test_l2vit', features_only=True).eval()
    x = torch.randn(1, 3, 64, 96)
    feats = model(x)
    assert len(feats) == 4
    assert [f.shape[1:3] for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]  # NHWC maps
    assert model.feature_info.channels() == [24, 48, 72, 96]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    full = timm.create_model('test_l2vit').eval()
    final, inter = full.forward_intermediates(x, indices=(1, 3))
    assert [t.shape for t in inter] == [(1, 48, 8, 12), (1, 96, 2, 3)]  # NCHW by default
    assert torch.allclose(final, full.forward_features(x))
    full.prune_intermediate_layers(indices=(0, 1), prune_norm=True)
    assert len(full.stages) == 2


def test_timm_contract_pieces():
    model = timm.create_model('test_l2vit', drop_path_rate=0.2)
    assert model.no_weight_decay() == set()
    assert model.group_matcher()['stem'] == r'^stem'
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3
    model.reset_classifier(0, '')
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 2, 96)


def test_block_pattern_and_init():
    with torch.device('meta'):
        model = timm.create_model('l2vit_tiny')
    for stage in model.stages:
        kinds = [type(b).__name__ for b in stage.blocks]
        assert kinds == ['LocalWindowBlock', 'LinearGlobalBlock'] * (len(kinds) // 2)
    with torch.device('meta'):
        assert timm.create_model('l2vit_base_384').stages[0].blocks[0].window_size == 12
    tiny = timm.create_model('test_l2vit')
    attn = tiny.stages[3].blocks[1].attn
    assert torch.allclose(attn.temperature, torch.full((4, 1, 1), 24 ** -0.5))


def test_autocast_bf16():
    model = timm.create_model('test_l2vit').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        out = model(x)
    with torch.no_grad():
        ref = model(x)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 5e-2


def test_rejects_bad_input():
    model = timm.create_model('test_l2vit').eval()
    with pytest.raises(ValueError, match=r'NCHW image batch \[B, 3, H, W\]'):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r'NCHW image batch'):
        model(torch.randn(1, 64, 64, 3))  # channels-last
    with pytest.raises(ValueError, match='divisible by its num_heads'):
        L2ViT(dims=(16, 32, 48, 64), num_heads=(3, 2, 3, 4))
    with pytest.raises(ValueError, match='one value per stage'):
        L2ViT(dims=(16, 32, 48), depths=(2, 2, 2, 2))


def test_converter_rejects_unknown_arguments():
    with pytest.raises(ValueError, match=r"does not know: \['kernel_size'\]"):
        build_from_official('l2vit', 'classification/models/l2vit.py:L2ViT', {'kernel_size': 7})
    with pytest.raises(ValueError, match='official_class for l2vit'):
        convert_official('models/swin.py:Swin', {})
    with pytest.raises(ValueError, match='conv_stem=False is not supported'):
        convert_official('classification/models/l2vit.py:L2ViT', {'block_type': 'mix_local_enhanced_vit'})
    with pytest.raises(ValueError, match='last_proj=True is not supported'):
        convert_official('classification/models/l2vit.py:L2ViT', {
            'conv_stem': True, 'block_type': 'mix_local_enhanced_vit', 'last_proj': True})
