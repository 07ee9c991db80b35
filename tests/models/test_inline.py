"""InLine on DeiT / PVT / Swin / CSwin: parity with the original code, converter on the released layouts,
timm contract, bad input."""
import json

import pytest
import timm
import torch

import visionmix  # noqa: F401
from tests.conftest import parity_dir, parity_error, parity_files
from visionmix.convert import build_from_official
from visionmix.layers import InLineAttention
from visionmix.models.inline import convert_official
from visionmix.models.inline_swin import InLineSwin

VARIANTS = {
    'deit': ['inline_deit_tiny', 'inline_deit_small', 'inline_deit_base'],
    'pvt': ['inline_pvt_tiny', 'inline_pvt_small', 'inline_pvt_medium', 'inline_pvt_large'],
    'swin': ['inline_swin_tiny', 'inline_swin_small', 'inline_swin_base', 'inline_swin_base_384'],
    'cswin': ['inline_cswin_tiny', 'inline_cswin_small', 'inline_cswin_base', 'inline_cswin_base_384'],
}
TEST_VARIANTS = ['test_inline_deit', 'test_inline_pvt', 'test_inline_swin', 'test_inline_cswin']


def _tokens(t):
    """NCHW map -> [B, H*W, C] tokens (the layout of the fixtures' features)."""
    return t.flatten(2).transpose(1, 2)


def _features(model, host, x, names):
    """The model's outputs named like the original's feature_names."""
    if host == 'deit':
        final, blocks = model.forward_intermediates(x, return_prefix_tokens=True, output_fmt='NLC')
        got = {f'blocks.{i}': torch.cat([cls, tokens], dim=1) for i, (tokens, cls) in enumerate(blocks)}
        got['norm'] = final
        return [got[n] for n in names]
    final, stages = model.forward_intermediates(x, output_fmt='NCHW')
    out = []
    for name in names:
        if name == 'norm':
            out.append(final.flatten(1, 2) if final.dim() == 4 and host != 'pvt' else _tokens(final))
            continue
        head = name.split('.')[0]
        stage = int(name.split('.')[1]) if head == 'layers' else int(head.removeprefix('block').removeprefix(
            'stage')) - 1
        out.append(_tokens(stages[stage]))
    return out


@pytest.mark.parametrize('path', parity_files('inline'))
def test_parity_with_original(path):
    case = torch.load(path, weights_only=True)
    model = build_from_official(case['family'], case['official_class'], case['official_kwargs'],
                                case['state_dict']).double()
    host = case['official_class'].split('inline_')[1].split('.py')[0]
    x = case['input'].double()
    with torch.no_grad():
        out = model(x)
        assert parity_error(out, case['output']) < 1e-6
        names = case.get('feature_names', [])
        for name, got, ref in zip(names, _features(model, host, x, names), case.get('features', [])):
            assert got.shape == ref.shape, name
            assert parity_error(got, ref) < 1e-6, name


def _manifests():
    files = sorted(parity_dir().glob('inline/manifest_*.json'))
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f'no manifests under {parity_dir()}'))]
    return [pytest.param(f, id=f.stem.removeprefix('manifest_')) for f in files]


@pytest.mark.parametrize('path', _manifests())
def test_converter_accepts_released_layout(path):
    manifest = json.loads(path.read_text())
    host = manifest['variant'].split('_')[1]
    official_class = {'deit': 'models/inline_deit.py:VisionTransformer',
                      'pvt': 'models/inline_pvt.py:PyramidVisionTransformer',
                      'swin': 'models/inline_swin.py:InLineSwin',
                      'cswin': 'models/inline_cswin.py:CSWinTransformer'}[host]
    with torch.device('meta'):
        state_dict = {k: torch.empty(shape) for k, shape in manifest['keys'].items()}
        model = build_from_official('inline', official_class, manifest['official_kwargs'], {'model': state_dict})
    assert sum(p.numel() for p in model.parameters()) == manifest['num_params']
    # the registered variant builds the same architecture as the original builder
    with torch.device('meta'):
        registered = timm.create_model(manifest['variant'])
    assert {k: v.shape for k, v in registered.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}


def test_registered_names_and_pretrained_cfgs():
    names = set(timm.list_models('*inline*'))
    assert {n for v in VARIANTS.values() for n in v} | set(TEST_VARIANTS) <= names
    released = [n for v in VARIANTS.values() for n in v if not n.endswith('_384')]
    for name in released:
        cfg = timm.models.get_pretrained_cfg(name + '.in1k')
        assert cfg.url.startswith('https://cloud.tsinghua.edu.cn/f/'), name
        assert cfg.paper_ids == 'arXiv:2412.06590' and cfg.interpolation == 'bicubic' and cfg.crop_pct == 0.875
    assert timm.models.get_pretrained_cfg('inline_deit_small.in1k').input_size == (3, 288, 288)
    assert timm.models.get_pretrained_cfg('inline_deit_base.in1k').input_size == (3, 448, 448)
    for name in ('inline_swin_base_384', 'inline_cswin_base_384'):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.input_size == (3, 384, 384) and cfg.crop_pct == 1.0 and not cfg.url


def test_swin_block_types_follow_release():
    with torch.device('meta'):
        tiny, base, base_384 = (timm.create_model(n) for n in ('inline_swin_tiny', 'inline_swin_base',
                                                                'inline_swin_base_384'))
    kinds = lambda m, i: ''.join(b.attn_type for b in m.layers[i].blocks)  # noqa: E731
    assert [kinds(tiny, i) for i in range(4)] == ['II', 'II', 'I' * 6, 'SS']
    assert kinds(base, 2) == 'II' + 'S' * 16 and kinds(base, 3) == 'SS'
    assert base.layers[2].blocks[2].window_size == 7 and base_384.layers[2].blocks[2].window_size == 12


@pytest.mark.parametrize('name', TEST_VARIANTS)
def test_forward_backward_other_size(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    default = model.pretrained_cfg['input_size'][1]
    x = torch.randn(2, 3, default * 3 // 2 if 'cswin' in name else default * 2, default * 2)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        model.eval()
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)


@pytest.mark.parametrize('name', TEST_VARIANTS)
def test_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    size = model.pretrained_cfg['input_size'][1]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        feats = model(x)
    if 'deit' in name:  # not hierarchical: four evenly spaced blocks, NCHW maps at the patch stride
        assert len(feats) == 4 and all(f.shape == (1, 64, size // 8, size // 8) for f in feats)
        assert [info['module'] for info in model.feature_info.get_dicts()] == [f'blocks.{i}' for i in range(4)]
    else:
        assert len(feats) == 4
        assert [f.shape[1] for f in feats] == model.feature_info.channels()
        assert [size // f.shape[-1] for f in feats] == model.feature_info.reduction() == [4, 8, 16, 32]


def test_windowed_inline_and_shifted_masks_at_larger_input():
    model = timm.create_model('test_inline_swin').eval()
    block = model.layers[0].blocks[0]
    assert block.window_and_shift(32, 32) == ((32, 32), 0)  # native: global
    assert model.layers[0].blocks[0].window_and_shift(64, 64) == ((32, 32), 0)
    odd = model.layers[3].blocks[1]  # softmax, window 4 from the native 4x4 map
    assert odd.window_and_shift(4, 4) == ((4, 4), 0) and odd.window_and_shift(8, 8) == ((4, 4), 2)


def test_grad_checkpointing_and_contract_pieces():
    for name in TEST_VARIANTS:
        model = timm.create_model(name)
        x = torch.randn(1, 3, *model.pretrained_cfg['input_size'][1:])
        ref = model.eval()(x)
        model.set_grad_checkpointing(True)
        assert torch.allclose(model(x), ref, atol=1e-6)
        assert model.group_matcher()['stem']
        model.reset_classifier(3)
        assert model.get_classifier().out_features == 3


def test_inline_attention_matches_formula():
    torch.manual_seed(0)
    attn = InLineAttention(8, 2).double()
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    q, k, v = attn.qkv(x).chunk(3, -1)
    heads = lambda t: t.reshape(2, 16, 2, 4).transpose(1, 2)  # noqa: E731
    qh, kh, vh = heads(q), heads(k), heads(v)
    s = 4 ** -0.5
    weights = s / 16 * (qh @ kh.transpose(-2, -1) - qh @ kh.mean(2, keepdim=True).transpose(-2, -1)) + 1 / 16
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 16, dtype=torch.float64))
    glob = (weights @ vh).transpose(1, 2).reshape(2, 16, 8)
    with torch.no_grad():  # zero kernels: no local term, the pure InLine readout
        attn.residual[2].weight.zero_()
        attn.residual[2].bias.zero_()
    assert torch.allclose(attn.attend(q, k, v, (4, 4), x.mean(1)), glob)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"does not know: \['window'\]"):
        convert_official('models/inline_swin.py:InLineSwin', {'window': 7})
    with pytest.raises(ValueError, match='official_class for inline'):
        convert_official('models/swin.py:SwinTransformer', {})
    with pytest.raises(ValueError, match='la_sr_ratios'):
        convert_official('models/inline_pvt.py:PyramidVisionTransformer', {'la_sr_ratios': '8421'})
    with pytest.raises(ValueError, match='distilled'):
        convert_official('models/inline_deit.py:VisionTransformer', {'distilled': True})
    with pytest.raises(ValueError, match='attn_type'):
        InLineSwin(depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), attn_type='IIMS')
    with pytest.raises(ValueError, match='la_split_size equal'):
        timm.create_model('test_inline_cswin', la_split_size=(8, 8, 4, 2))
    with pytest.raises(ValueError, match='divisible by num_heads'):
        InLineAttention(10, 3)
    swin = timm.create_model('test_inline_swin').eval()
    with pytest.raises(ValueError, match='40x40 map must be divisible by the 32x32 window'):
        swin(torch.randn(1, 3, 160, 160))  # stage-1 map 40x40 under 32x32 InLine windows
    with pytest.raises(ValueError, match='smaller than'):
        swin(torch.randn(1, 3, 64, 64))  # stage-4 map 2x2 under a 4x4 softmax window
    with pytest.raises(ValueError, match='prefix tokens'):
        InLineAttention(8, 2, num_prefix_tokens=1)(torch.randn(1, 16, 8), (4, 4))


@pytest.mark.parametrize('host', ['deit', 'pvt', 'swin', 'cswin'])
def test_pretrained_loading_through_timm(host, tmp_path, fake_yacs):
    """A released-style training dict (a pickled yacs config, weights under 'model') loads through timm's
    pretrained path (custom_load -> load_pretrained; a local file needs custom_load=True in the overlay, timm
    resets it for a new source) and reproduces the original; another num_classes keeps all but the classifier."""
    path = parity_dir() / 'inline' / f'{host}_case1.pt'
    if not path.exists():
        pytest.skip(f'no parity fixture {path}')
    case = torch.load(path, weights_only=True)
    file = tmp_path / f'inline_{host}.pth'
    config = fake_yacs({'MODEL': fake_yacs({'TYPE': f'inline_{host}'}), 'SEED': 0})
    torch.save({'model': case['state_dict'], 'config': config, 'epoch': 299}, file)
    _, kwargs, _ = convert_official(case['official_class'], case['official_kwargs'])
    name = VARIANTS[host][0]
    assert timm.models.get_pretrained_cfg(f'{name}.in1k').custom_load is True
    overlay = dict(file=str(file), num_classes=kwargs['num_classes'], custom_load=True)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).double().eval()
    with torch.no_grad():
        assert parity_error(model(case['input'].double()), case['output']) < 1e-6
    other = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file), custom_load=True),
                              **dict(kwargs, num_classes=3))
    assert other.get_classifier().out_features == 3
    first_conv = timm.models.get_pretrained_cfg(f'{name}.in1k').first_conv + '.weight'
    assert torch.equal(other.state_dict()[first_conv], model.state_dict()[first_conv].float())


def test_checkpoint_filters_unwrap_and_resize():
    """Training dicts ('model', 'module.' prefixes) load, and position tables follow the model's size."""
    if not (parity_dir() / 'inline').is_dir():
        pytest.skip(f'no parity fixtures at {parity_dir()}')
    case = torch.load(parity_dir() / 'inline' / 'deit_case1.pt', weights_only=True)
    wrapped = {'model': {'module.' + k: v for k, v in case['state_dict'].items()}, 'epoch': 3}
    cls, kwargs, filter_fn = convert_official(case['official_class'], case['official_kwargs'])
    model = cls(**dict(kwargs, img_size=128))  # 8x8 grid instead of the checkpoint's 6x6
    model.load_state_dict(filter_fn(wrapped, model))
    assert model.pos_embed.shape == (1, 65, 64)
    case = torch.load(parity_dir() / 'inline' / 'swin_case2.pt', weights_only=True)
    cls, kwargs, filter_fn = convert_official(case['official_class'], case['official_kwargs'])
    model = cls(**dict(kwargs, img_size=384, window_size=96))  # softmax windows 12 instead of 7
    model.load_state_dict(filter_fn({'model': case['state_dict']}, model))
    assert model.layers[2].blocks[2].attn.relative_position_bias_table.shape == (23 * 23, 2)
    case = torch.load(parity_dir() / 'inline' / 'pvt_case2.pt', weights_only=True)
    cls, kwargs, filter_fn = convert_official(case['official_class'], case['official_kwargs'])
    model = cls(**dict(kwargs, img_size=96))
    model.load_state_dict(filter_fn(case['state_dict'], model))
    assert model.stages[1].pos_embed.shape == (1, 144, 32)


def test_pvt_softmax_stages_with_spatial_reduction():
    model = timm.create_model('test_inline_pvt', attn_type='IISS', sr_ratios=(8, 4, 2, 1)).eval()
    assert hasattr(model.stages[2].blocks[0].attn, 'sr') and not hasattr(model.stages[3].blocks[0].attn, 'sr')
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 1000)
