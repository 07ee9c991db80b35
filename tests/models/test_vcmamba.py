"""VCMamba: parity with the original code, converter on the released layouts, scan tables, position-embedding
resizing, folded heads, timm contract, bad input."""
import argparse
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import visionmix  # noqa: F401
from tests.conftest import parity_dir, parity_error, parity_files
from visionmix.convert import build_from_official
from visionmix.models.vcmamba import (
    VCMamba,
    checkpoint_filter_fn,
    convert_official,
    resample_pos_embed,
    scan_orders,
    scan_tables,
)

OFFICIAL_CLASS = 'model/mambacnn.py:EfficientFormer'
SIZES = {'S': 'small', 'M': 'medium', 'B': 'base'}


def _load(path):
    if path is None:
        pytest.skip('no parity fixtures')
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize('path', parity_files('vcmamba'))
def test_parity_with_original(path):
    """Logits and stage outputs of the original (float64) through build_from_official. The stage outputs match to
    float64 rounding; the logits to float32 rounding of the folded head (head + dist_head) / 2, and to float64
    rounding once the head is folded in float64."""
    case = torch.load(path, weights_only=True)
    model = build_from_official(case['family'], case['official_class'], case['official_kwargs'],
                                case['state_dict']).double()
    x = case['input'].double()
    with torch.no_grad():
        final, stages = model.forward_intermediates(x)
        out = model.forward_head(final)
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    assert parity_error(out, case['output']) < 1e-6
    assert len(case['features']) == len(case['feature_names']) > 0
    for name, ref in zip(case['feature_names'], case['features']):
        assert parity_error(stages[int(name.removeprefix('stage')) - 1], ref) < 1e-12, name
    sd = case['state_dict']
    with torch.no_grad():
        model.head.fc.weight.copy_((sd['head.weight'].double() + sd['dist_head.weight'].double()) / 2)
        model.head.fc.bias.copy_((sd['head.bias'].double() + sd['dist_head.bias'].double()) / 2)
        assert parity_error(model.forward_head(final), case['output']) < 1e-12


def test_eval_logits_are_the_mean_of_both_heads():
    """The folded classifier gives the original's eval output (head + dist_head) / 2 on the pooled normed tokens;
    with distillation=False the single head is loaded as is."""
    case = _load(parity_files('vcmamba')[-1].values[0])
    sd = case['state_dict']
    model = build_from_official('vcmamba', OFFICIAL_CLASS, case['official_kwargs'], sd)
    torch.testing.assert_close(model.head.fc.weight, (sd['head.weight'] + sd['dist_head.weight']) / 2, rtol=0, atol=0)
    feats = torch.randn(2, model.num_features, 3, 3)
    with torch.no_grad():
        pooled = model.forward_head(feats, pre_logits=True)
        both = (F.linear(pooled, sd['head.weight'], sd['head.bias'])
                + F.linear(pooled, sd['dist_head.weight'], sd['dist_head.bias'])) / 2
        torch.testing.assert_close(model.forward_head(feats), both)
    torch.testing.assert_close(pooled, feats.mean((2, 3)))
    single = {k: v for k, v in sd.items() if not k.startswith('dist_head.')}
    model = build_from_official('vcmamba', OFFICIAL_CLASS, dict(case['official_kwargs'], distillation=False), single)
    assert torch.equal(model.head.fc.weight, sd['head.weight'])


def _manifests():
    files = sorted(parity_dir().glob('vcmamba/manifest_*.json'))
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f'no manifests under {parity_dir()}'))]
    return [pytest.param(f, id=f.stem.removeprefix('manifest_')) for f in files]


@pytest.mark.parametrize('path', _manifests())
def test_converter_accepts_released_layout(path):
    """Every released key converts and loads strictly; the parameter count is the original's minus the folded
    dist_head (S 10,189,720 / M 20,623,176 / B 30,937,832); the registered variant has the same layout."""
    manifest = json.loads(path.read_text())
    keys = manifest['keys']
    dist_head = math.prod(keys['dist_head.weight']) + math.prod(keys['dist_head.bias'])
    with torch.device('meta'):
        state_dict = {k: torch.empty(shape) for k, shape in keys.items()}
        released = {'model': state_dict, 'model_ema': state_dict, 'epoch': 299}  # the released training dicts
        model = build_from_official('vcmamba', manifest['official_class'], manifest['official_kwargs'], released)
    num_params = sum(p.numel() for p in model.parameters())
    assert num_params == manifest['num_params'] - dist_head == manifest['num_params_without_dist_head']
    assert len(model.state_dict()) == manifest['num_keys'] - 2  # dist_head.{weight,bias} folded into head.fc
    with torch.device('meta'):
        registered = timm.create_model(f"vcmamba_{SIZES[manifest['variant'].split('-')[1]]}")
    assert {k: v.shape for k, v in registered.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}
    assert registered.stages[3].mamba_start == manifest['official_kwargs']['layers'][3] - 4


def test_registered_names_and_pretrained_cfgs():
    assert {'vcmamba_small', 'vcmamba_medium', 'vcmamba_base', 'test_vcmamba'} <= set(timm.list_models(
        module='vcmamba'))
    pretrained = timm.list_pretrained('vcmamba_*')
    assert sorted(pretrained) == ['vcmamba_base.in1k', 'vcmamba_medium.in1k', 'vcmamba_small.in1k']
    for name in pretrained:
        cfg = timm.models.get_pretrained_cfg(name)
        size = {v: k for k, v in SIZES.items()}[name.split('.')[0].split('_')[1]]
        assert cfg.hf_hub_id == 'SLDGroup/VCMamba' and cfg.hf_hub_filename == f'VCMamba-{size}.pth'
        assert cfg.paper_ids == 'arXiv:2509.04669' and cfg.custom_load
        assert cfg.crop_pct == 0.875 and cfg.interpolation == 'bicubic' and cfg.input_size == (3, 224, 224)
        assert cfg.first_conv == 'stem.0' and cfg.classifier == 'head.fc'


def test_scan_tables_worked_example():
    """H=3, W=4 (fact sheet): row snake o1/d1, column snake o3/d3; o2 and o4 are their exact reverses, with the
    codes of the reversed moves (left/up), not the forward codes reversed."""
    orders, codes = scan_orders(3, 4)
    assert orders[0].tolist() == [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]
    assert codes[0].tolist() == [0, 1, 1, 1, 4, 2, 2, 2, 4, 1, 1, 1]
    assert orders[2].tolist() == [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3]
    assert codes[2].tolist() == [0, 4, 4, 1, 3, 3, 1, 4, 4, 1, 3, 3]
    assert torch.equal(orders[1], orders[0].flip(0)) and torch.equal(orders[3], orders[2].flip(0))
    assert codes[1].tolist() == [0, 2, 2, 2, 3, 1, 1, 1, 3, 2, 2, 2]
    assert codes[3].tolist() == [0, 4, 4, 2, 3, 3, 2, 4, 4, 2, 3, 3]
    assert [set(c.tolist()) for c in codes] == [{0, 1, 2, 4}, {0, 1, 2, 3}, {0, 1, 3, 4}, {0, 2, 3, 4}]


@pytest.mark.parametrize('height,width', [(3, 4), (4, 3), (4, 6), (5, 2), (7, 7), (1, 5), (1, 1)])
def test_scan_tables_reverse_start_corners(height, width):
    """The reversed row snake starts at (H-1, W-1) going left for odd H, at (H-1, 0) going right for even H; the
    reversed column snake at (H-1, W-1) going up for odd W, at (0, W-1) going down for even W."""
    orders, codes = scan_orders(height, width)
    length = height * width
    for row in orders:
        assert sorted(row.tolist()) == list(range(length))
    assert divmod(orders[1, 0].item(), width) == ((height - 1, width - 1) if height % 2 else (height - 1, 0))
    assert divmod(orders[3, 0].item(), width) == ((height - 1, width - 1) if width % 2 else (0, width - 1))
    if width > 1:
        assert codes[1, 1].item() == (2 if height % 2 else 1)
    if height > 1:
        assert codes[3, 1].item() == (3 if width % 2 else 4)
    # every step moves to a 4-neighbour in the direction its code names
    steps = {1: (0, 1), 2: (0, -1), 3: (-1, 0), 4: (1, 0)}
    for row, code in zip(orders, codes):
        assert code[0] == 0
        for t in range(1, length):
            (r0, c0), (r1, c1) = divmod(row[t - 1].item(), width), divmod(row[t].item(), width)
            assert (r1 - r0, c1 - c0) == steps[code[t].item()]


def test_scan_tables_are_cached():
    first = scan_tables(5, 6, torch.device('cpu'))
    assert scan_tables(5, 6, torch.device('cpu')) is first
    with torch.inference_mode():
        tables = scan_tables(6, 5, torch.device('cpu'))
    assert not tables[0].is_inference()  # usable later with autograd


def test_forward_backward_non_square():
    torch.manual_seed(0)
    model = timm.create_model('test_vcmamba', num_classes=7, drop_path_rate=0.1)
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    mixer = model.stages[3].blocks[1].mixer
    for p in (mixer.A_log, mixer.D, mixer.direction_Bs, mixer.dt_proj.bias, model.stages[3].pos_embed):
        assert p.grad.abs().sum() > 0
    assert model.forward_features(x).shape == (2, model.num_features, 2, 3)


def test_any_input_size():
    """The conv stack takes any size (each stride-2 conv rounds up); the position embedding follows the grid."""
    model = timm.create_model('test_vcmamba').eval()
    with torch.no_grad():
        out = model.forward_intermediates(torch.randn(1, 3, 45, 71), intermediates_only=True)
        assert [tuple(t.shape[2:]) for t in out] == [(12, 18), (6, 9), (3, 5), (2, 3)]
        assert model(torch.randn(1, 3, 20, 20)).shape == (1, 1000)  # a 1x1 grid


def test_pos_embed_interpolation():
    """A model stored for 224 given 288 (or non-square) input equals a model created for that size whose position
    embedding was resampled by checkpoint_filter_fn; both differ from the output without the embedding."""
    torch.manual_seed(0)
    small = timm.create_model('test_vcmamba', img_size=224).eval()
    assert small.stages[3].pos_embed.shape[-2:] == (7, 7)
    for size in ((288, 288), (256, 320)):
        big = timm.create_model('test_vcmamba', img_size=size).eval()
        assert big.stages[3].pos_embed.shape[-2:] == (size[0] // 32, size[1] // 32)
        big.load_state_dict(checkpoint_filter_fn(small.state_dict(), big), strict=True)
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = big(x)
            torch.testing.assert_close(small(x), expected, rtol=1e-6, atol=1e-6)
            without = timm.create_model('test_vcmamba', img_size=224).eval()
            without.load_state_dict(small.state_dict())
            without.stages[3].pos_embed.zero_()
            assert (without(x) - expected).abs().max() > 1e-4
    # at the stored grid nothing is resampled; the NCHW resize keeps channels apart
    pos = small.stages[3].pos_embed
    assert resample_pos_embed(pos, [7, 7]) is pos
    const = torch.arange(3.).view(1, 3, 1, 1).expand(1, 3, 7, 7)
    torch.testing.assert_close(resample_pos_embed(const, [9, 5]), torch.arange(3.).view(1, 3, 1, 1).expand(1, 3, 9, 5))
    # set_input_size stores the table resized the same way, still trainable
    small.set_input_size(288)
    assert small.stages[3].pos_embed.requires_grad
    torch.testing.assert_close(small.stages[3].pos_embed, resample_pos_embed(pos.detach(), [9, 9]))


def test_released_pos_embed_resampled_on_load():
    """An original-layout checkpoint (7x7 grid) loads into a model for another size with its embedding resized."""
    case = _load(parity_files('vcmamba')[0].values[0])
    model_cls, kwargs, filter_fn = convert_official(case['official_class'], case['official_kwargs'])
    model = model_cls(**dict(kwargs, img_size=256))
    model.load_state_dict(filter_fn(case['state_dict'], model), strict=True)
    torch.testing.assert_close(model.stages[3].pos_embed, resample_pos_embed(case['state_dict']['pos_embed'], [8, 8]))


def test_features_only_and_intermediates():
    torch.manual_seed(0)
    model = timm.create_model('test_vcmamba', features_only=True).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = model(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 16, 24), (12, 8, 12), (16, 4, 6), (24, 2, 3)]
    assert model.feature_info.channels() == [8, 12, 16, 24]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    torch.manual_seed(0)
    full = timm.create_model('test_vcmamba').eval()
    with torch.no_grad():
        final, inter = full.forward_intermediates(x, indices=(1, 3))
        torch.testing.assert_close(inter[0], feats[1])
        torch.testing.assert_close(inter[1], feats[3])  # raw stage output, no norm
        torch.testing.assert_close(final, full.forward_features(x))
        normed = full.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(normed, final)
    full.prune_intermediate_layers(indices=(0, 1))
    assert len(full.stages) == 2 and full.num_features == 12
    with torch.no_grad():
        torch.testing.assert_close(full.forward_features(x), feats[1])


def test_pretrained_loading_through_timm(tmp_path):
    """A release-format training dict (weights under 'model', pickled argparse args) loads through timm's
    pretrained path and reproduces the original; another num_classes keeps everything but the classifier."""
    case = _load(parity_files('vcmamba')[-1].values[0])
    file = tmp_path / 'VCMamba-reduced.pth'
    torch.save({'model': case['state_dict'], 'model_ema': {}, 'epoch': 299, 'scaler': 'none',
                'args': argparse.Namespace(model='VCMamba_EfficientFormer_S', lr=1e-3)}, file)
    kw = case['official_kwargs']
    arch = dict(depths=kw['layers'], embed_dims=kw['embed_dims'], num_mamba=kw['vit_num'], img_size=kw['resolution'])
    overlay = dict(file=str(file), custom_load=True)
    model = timm.create_model('vcmamba_small', pretrained=True, num_classes=kw['num_classes'], **arch,
                              pretrained_cfg_overlay=dict(overlay, num_classes=kw['num_classes'])).double().eval()
    with torch.no_grad():
        assert parity_error(model(case['input'].double()), case['output']) < 1e-6
    other = timm.create_model('vcmamba_small', pretrained=True, pretrained_cfg_overlay=overlay, num_classes=3, **arch)
    assert other.get_classifier().out_features == 3
    own = {k: v.double() for k, v in other.state_dict().items() if not k.startswith('head.')}
    ref = {k: v for k, v in model.state_dict().items() if not k.startswith('head.')}
    assert own.keys() == ref.keys() and all(torch.equal(own[k], ref[k]) for k in own)
    headless = timm.create_model('vcmamba_small', pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0,
                                 **arch)
    assert torch.equal(headless.stem[0].weight, other.stem[0].weight)


def test_initialisation():
    model = timm.create_model('test_vcmamba')
    mixer = model.stages[3].blocks[1].mixer
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1., 17.)).expand(mixer.d_inner, 16))
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    assert torch.equal(mixer.dt_proj.bias, torch.zeros_like(mixer.dt_proj.bias))  # Linear re-init, as the original
    assert mixer.direction_Bs.shape == (5, 16) and 0.01 < mixer.direction_Bs.std() < 0.03  # trunc_normal(0.02)
    assert torch.equal(model.stages[0].blocks[0].layer_scale, torch.full((8,), 1e-5))
    assert 0.01 < model.stages[3].pos_embed.std() < 0.03
    assert torch.equal(model.stages[0].blocks[0].mlp.fc1.bias, torch.zeros(32))


def test_timm_contract_pieces():
    assert timm.create_model('test_vcmamba').stages[3].blocks[2].drop_path.__class__ is torch.nn.Identity  # rate 0
    model = timm.create_model('test_vcmamba', drop_path_rate=0.2)
    assert model.no_weight_decay() == {'stages.3.pos_embed', 'stages.3.blocks.1.mixer.A_log',
                                       'stages.3.blocks.1.mixer.direction_Bs', 'stages.3.blocks.2.mixer.A_log',
                                       'stages.3.blocks.2.mixer.direction_Bs'}
    assert model.group_matcher()['stem'] == r'^stem'
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    x = torch.randn(1, 3, 64, 64)
    model(x).sum().backward()
    assert model.stages[3].blocks[2].mixer.x_proj.weight.grad is not None
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3
    model.reset_classifier(0, '')
    assert model(x).shape == (1, 24, 2, 2)
    # drop path rises linearly over all blocks, the Mamba blocks included: 0 ... 0.2
    rates = [getattr(b.drop_path, 'drop_prob', 0.) for s in model.stages for b in s.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.2, len(rates)))


def test_autocast_bf16():
    torch.manual_seed(0)
    model = timm.create_model('test_vcmamba').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        out = model(x)
    with torch.no_grad():
        ref = model(x)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 5e-2


def test_triton_scan_path_matches_reference(monkeypatch):
    """The model on the Triton selective scan (interpreter on CPU) gives the reference's logits and gradients."""
    torch.manual_seed(0)
    model = timm.create_model('test_vcmamba', d_state=4, num_classes=5).eval()
    x = torch.randn(1, 3, 64, 96)

    def run(backend):
        monkeypatch.setenv('VISIONMIX_BACKEND', backend)
        model.zero_grad()
        xi = x.clone().requires_grad_()
        out = model(xi)
        out.pow(2).sum().backward()
        mixer = model.stages[3].blocks[1].mixer
        return out, xi.grad, mixer.A_log.grad.clone(), mixer.direction_Bs.grad.clone(), mixer.dt_proj.bias.grad.clone()

    for name, got, want in zip(('logits', 'dx', 'dA_log', 'ddirection_Bs', 'ddt_bias'), run('triton'), run('torch')):
        assert ((got - want).norm() / want.norm()).item() < 1e-5, name


def test_torch_compile_fullgraph():
    """The scan tables are built inside the graph when compiling (no cache lookups, no graph breaks)."""
    torch.manual_seed(0)
    model = timm.create_model('test_vcmamba', num_classes=5).eval()
    x = torch.randn(1, 3, 64, 96)
    compiled = torch.compile(model, backend='eager', fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_bad_input():
    model = timm.create_model('test_vcmamba').eval()
    with pytest.raises(ValueError, match='NCHW'):
        model(torch.randn(2, 64, 64))
    with pytest.raises(ValueError, match='in_chans=3'):
        model(torch.randn(1, 64, 64, 3))  # NHWC
    with pytest.raises(ValueError, match='num_mamba'):
        VCMamba(embed_dims=(8, 12, 16, 24), depths=(1, 1, 1, 2), num_mamba=3)
    with pytest.raises(ValueError, match='one width per stage'):
        VCMamba(embed_dims=(8, 12, 16), depths=(1, 1, 1, 2), num_mamba=1)
    with pytest.raises(ValueError, match='at least 1x1'):
        scan_orders(0, 3)


def test_converter_rejects_bad_arguments():
    kwargs = dict(layers=[1, 1, 1, 2], embed_dims=[8, 12, 16, 24], downsamples=[True] * 4, vit_num=1,
                  resolution=64, if_abs_pos_embed=True)
    with pytest.raises(ValueError, match=r"does not know: \['window_size'\]"):
        build_from_official('vcmamba', OFFICIAL_CLASS, dict(kwargs, window_size=7))
    with pytest.raises(ValueError, match='official_class for vcmamba'):
        build_from_official('vcmamba', 'model/efficientformer.py:EfficientFormer', kwargs)
    with pytest.raises(ValueError, match='downsamples'):
        build_from_official('vcmamba', OFFICIAL_CLASS, dict(kwargs, downsamples=[True, False, True, True]))
    with pytest.raises(ValueError, match='vit_num'):
        build_from_official('vcmamba', OFFICIAL_CLASS, dict(kwargs, vit_num=0))
    with pytest.raises(ValueError, match=r"must give \['vit_num'\]"):
        build_from_official('vcmamba', OFFICIAL_CLASS, {k: v for k, v in kwargs.items() if k != 'vit_num'})
    with pytest.raises(ValueError, match='fork_feat'):
        build_from_official('vcmamba', OFFICIAL_CLASS, dict(kwargs, fork_feat=True))
    with pytest.raises(ValueError, match='4 stages'):
        build_from_official('vcmamba', OFFICIAL_CLASS, dict(kwargs, layers=[1, 1, 2], embed_dims=[8, 12, 16]))
    # the original defaults: no position embedding unless asked for, no layer scale when switched off
    model = build_from_official('vcmamba', OFFICIAL_CLASS, dict(kwargs, if_abs_pos_embed=False,
                                                                use_layer_scale=False))
    assert model.stages[3].pos_embed is None and model.stages[0].blocks[0].layer_scale is None
    assert model.no_weight_decay() == {'stages.3.blocks.1.mixer.A_log', 'stages.3.blocks.1.mixer.direction_Bs'}
