"""BiFormer: parity with the original code, converter on the released layouts, bi-level routing attention semantics
(routing, padding), timm contract, bad input."""
import argparse
import json

import pytest
import timm
import torch
import torch.nn.functional as F

import visionmix  # noqa: F401
from tests.conftest import parity_dir, parity_error, parity_files
from visionmix.convert import build_from_official
from visionmix.models.biformer import BiFormer, BiLevelRoutingAttention, RegionRouter, convert_official

RELEASED = {  # name -> parameter count of the original model (T/S/B: manifests in shared/parity; STL: the
    # original factories biformer_stl / biformer_stl_nchw, 28.4M in the original README)
    'biformer_tiny': 13_142_760, 'biformer_small': 25_536_232, 'biformer_base': 56_804_968,
    'biformer_stl': 28_372_552, 'biformer_stl_nchw': 28_372_552,
}


@pytest.mark.parametrize('path', parity_files('biformer'))
def test_parity_with_original(path):
    case = torch.load(path, weights_only=True)
    model = build_from_official(case['family'], case['official_class'], case['official_kwargs'],
                                case['state_dict']).double()
    x = case['input'].double()
    captured = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
             for n in case['feature_names']]  # the original's stages.{i} output is this model's stages.{i} output
    with torch.no_grad():
        out = model(x)
        final, stages = model.forward_intermediates(x)
    for h in hooks:
        h.remove()
    assert parity_error(out, case['output']) < 1e-6
    assert len(case['features']) == len(case['feature_names']) > 0
    for name, ref in zip(case['feature_names'], case['features']):
        assert parity_error(captured[name], ref) < 1e-6, name
        assert parity_error(stages[int(name.split('.')[1])], ref) < 1e-6, name
    assert torch.equal(final, model.forward_features(x))


def _manifests():
    files = sorted(parity_dir().glob('biformer/manifest_*.json'))
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f'no manifests under {parity_dir()}'))]
    return [pytest.param(f, id=f.stem.removeprefix('manifest_')) for f in files]


@pytest.mark.parametrize('path', _manifests())
def test_converter_accepts_released_layout(path):
    manifest = json.loads(path.read_text())
    assert manifest['checkpoint_nesting'] == 'model'
    with torch.device('meta'):
        state_dict = {k: torch.empty(shape) for k, shape in manifest['keys'].items()}
        released = {'model': state_dict, 'epoch': 299}
        model = build_from_official('biformer', manifest['official_class'], manifest['official_kwargs'], released)
        registered = timm.create_model(manifest['variant'])
    assert sum(p.numel() for p in model.parameters()) == manifest['num_params']
    # the registered variant builds the same architecture as the original factory
    assert {k: v.shape for k, v in registered.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}
    topks = [b.attn.router.topk if isinstance(b.attn, BiLevelRoutingAttention) else -2
             for s in model.stages for b in s.blocks[:1]]
    assert topks == manifest['official_kwargs']['topks']
    assert [b.attn.num_heads for s in model.stages for b in s.blocks[:1]] == [
        d // manifest['official_kwargs']['head_dim'] for d in manifest['official_kwargs']['qk_dims'][:3]] + [8]


@pytest.mark.parametrize('name', sorted(RELEASED))
def test_registered_param_counts(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == RELEASED[name]


def test_registered_names_and_pretrained_cfgs():
    assert set(RELEASED) | {'test_biformer'} <= set(timm.list_models(module='biformer'))
    pretrained = timm.list_pretrained('biformer_*')
    assert sorted(pretrained) == sorted(f'{n}.in1k' for n in RELEASED)
    files = set()
    for name in pretrained:
        cfg = timm.models.get_pretrained_cfg(name)
        url, file = cfg.url
        assert url.startswith('https://api.onedrive.com/v1.0/shares/s!') and url.endswith('/root/content'), name
        assert file == name.replace('.', '_') + '.pth'  # the original's torch.hub cache names
        files.add(file)
        assert cfg.custom_load is True and cfg.license == 'mit' and cfg.paper_ids == 'arXiv:2303.08810'
        assert cfg.first_conv == 'stem.0' and cfg.classifier == 'head.fc' and cfg.crop_pct == 0.875
    assert len(files) == len(pretrained)


def _original_stl_key(key: str, nchw: bool) -> str:
    """This model's key -> the original BiFormerSTL / nchwBiFormerSTL key (fact sheet layout)."""
    parts = key.split('.')
    if parts[0] == 'stem':
        return 'downsample_layers.0.' + '.'.join(parts[1:])
    if parts[0] == 'head':
        return 'head.' + '.'.join(parts[2:])
    if parts[0] != 'stages':
        return key
    if parts[2] == 'downsample':
        return f"downsample_layers.{parts[1]}.{0 if parts[3] == 'norm' else 1}." + '.'.join(parts[4:])
    rest = '.'.join(parts[4:])
    names = {'mlp.fc1.': 'mlp.0.', 'mlp.fc2.': 'mlp.2.'}
    if nchw and parts[1] != '3':
        names.update({'attn.qkv.': 'attn.qkv_linear.', 'attn.proj.': 'attn.output_linear.'})
    for new, old in names.items():
        rest = rest.replace(new, old)
    return f'stages.{parts[1]}.blocks.{parts[3]}.{rest}'


@pytest.mark.parametrize('nchw', [False, True], ids=['stl', 'stl_nchw'])
def test_converter_stl_layouts(nchw):
    """STL / STL-nchw state_dicts in the original layout (1x1 conv weights for STL-nchw) load strictly into the
    model built from the original kwargs, and reproduce a model loaded directly."""
    cls = 'models/biformer_stl_nchw.py:nchwBiFormerSTL' if nchw else 'models/biformer_stl.py:BiFormerSTL'
    kwargs = dict(depth=[1, 1, 2, 1], embed_dim=[16, 32, 48, 64], head_dim=8, mlp_ratios=[2] * 4,
                  norm_layer='BatchNorm2d', n_wins=(4, 4, 2, 1), topks=(1, 4, 2, -1 if nchw else -2), num_classes=5)
    model_cls, model_kwargs, filter_fn = convert_official(cls, kwargs)
    torch.manual_seed(0)
    ref = model_cls(**model_kwargs).eval()
    assert ref.stages[0].blocks[0].pos_embed is None
    assert ref.stages[0].blocks[0].attn.legacy is not nchw
    assert (ref.stages[3].blocks[0].attn.lepe_on_value is nchw)
    original = {}
    for key, value in ref.state_dict().items():
        if nchw and value.ndim == 2 and '.blocks.' in key:
            value = value[:, :, None, None]  # Linear -> 1x1 conv
        original[_original_stl_key(key, nchw)] = value
    assert 'downsample_layers.1.0.running_var' in original and 'stages.0.blocks.0.mlp.2.weight' in original
    if nchw:
        assert original['stages.0.blocks.0.attn.qkv_linear.weight'].shape == (48, 16, 1, 1)
    model = model_cls(**model_kwargs).eval()
    model.load_state_dict(filter_fn({'model': original}, model), strict=True)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_pretrained_loading_through_timm(tmp_path):
    """A released-style training dict (weights under 'model', pickled argparse args) loads through timm's pretrained
    path (custom_load -> load_pretrained; a local file needs custom_load=True in the overlay) and reproduces the
    original; another num_classes keeps all but the classifier."""
    path = parity_files('biformer')[0].values[0]
    if path is None:
        pytest.skip('no parity fixtures')
    case = torch.load(path, weights_only=True)
    file = tmp_path / 'biformer_reduced.pth'
    torch.save({'model': case['state_dict'], 'epoch': 299, 'args': argparse.Namespace(model='biformer_tiny')}, file)
    kw = case['official_kwargs']
    arch = dict(embed_dims=kw['embed_dim'], depths=kw['depth'], head_dim=kw['head_dim'])
    overlay = dict(file=str(file), custom_load=True)
    model = timm.create_model('biformer_tiny', pretrained=True, num_classes=kw['num_classes'], **arch,
                              pretrained_cfg_overlay=dict(overlay, num_classes=kw['num_classes'])).double().eval()
    with torch.no_grad():
        assert parity_error(model(case['input'].double()), case['output']) < 1e-6
    other = timm.create_model('biformer_tiny', pretrained=True, pretrained_cfg_overlay=overlay, num_classes=3, **arch)
    assert torch.equal(other.stem[0].weight, model.stem[0].weight.float())
    assert other.get_classifier().out_features == 3


def test_forward_backward_non_square():
    torch.manual_seed(0)
    model = timm.create_model('test_biformer', num_classes=7)
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.stages[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.forward_features(x).shape == (2, model.num_features, 2, 3)


def test_features_only_and_intermediates():
    torch.manual_seed(0)
    model = timm.create_model('test_biformer', features_only=True).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = model(x)
    assert [tuple(f.shape[2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert model.feature_info.channels() == [16, 32, 48, 64]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    torch.manual_seed(0)
    full = timm.create_model('test_biformer').eval()
    with torch.no_grad():
        final, inter = full.forward_intermediates(x, indices=(1, 3))
        assert [t.shape for t in inter] == [(1, 32, 8, 12), (1, 64, 2, 3)]
        torch.testing.assert_close(inter[0], feats[1])
        torch.testing.assert_close(final, full.forward_features(x))
        normed = full.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], final)
    full.prune_intermediate_layers(indices=(0, 1))
    assert len(full.stages) == 2 and isinstance(full.norm, torch.nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(full.forward_features(x), feats[1])


@pytest.mark.parametrize('size', [(160, 224), (256, 256)])
def test_released_architecture_other_sizes(size):
    """224-px models run at other sizes: maps not divisible by n_win=7 are padded (40x56 -> 42x63 in stage 1)."""
    model = timm.create_model('biformer_tiny').eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    assert [tuple(t.shape[2:]) for t in feats] == [tuple(s // r for s in size) for r in (4, 8, 16, 32)]


def _bra(dim=16, heads=2, **kwargs):
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention(dim, heads, **kwargs).double().eval()
    with torch.no_grad():  # a visible bias: padded tokens are not zero after the projection
        attn.qkv.bias.normal_()
    return attn


def test_bra_auto_pad_is_zero_padding_before_qkv():
    """Legacy auto_pad == zero-padding the (normed) input right/bottom to a multiple of n_win, then cropping."""
    attn = _bra(n_win=3, topk=2)
    x = torch.randn(2, 7, 8, 16, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x)
        padded = attn(F.pad(x, (0, 0, 0, 1, 0, 2)))  # 9 x 9: divisible, no padding inside
    assert out.shape == x.shape
    torch.testing.assert_close(out, padded[:, :7, :8], rtol=1e-13, atol=1e-13)
    strict = _bra(n_win=3, topk=2, auto_pad=False)
    with pytest.raises(ValueError, match='not divisible by n_win=3'):
        strict(x)


def test_bra_nchw_regions():
    """The refactored attention uses floor(size / n_win)-token regions and so more regions than n_win per side."""
    attn = _bra(n_win=3, topk=2, bra_impl='nchw')
    assert attn.region_grid(10, 9) == (4, 3, 3, 3)
    assert _bra(n_win=3, topk=2).region_grid(10, 9) == (3, 3, 4, 3)
    x = torch.randn(1, 10, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        assert attn(x).shape == x.shape
    with pytest.raises(ValueError, match='smaller than n_win=3'):
        attn(torch.randn(1, 2, 9, 16, dtype=torch.float64))


def test_bra_equals_dense_masked_attention():
    """BRA == dense attention in raster token order, masked to the routed regions (a region's tokens see the tokens
    of its top-k regions), with LePE on V and qk_dim ** -0.5 over all q/k channels as the scale."""
    attn = _bra(dim=12, heads=3, n_win=2, topk=2, qk_dim=24)
    x = torch.randn(2, 6, 4, 12, dtype=torch.float64)
    routed = {}
    attn.router.register_forward_hook(lambda m, i, o: routed.__setitem__('idx', o))
    with torch.no_grad():
        out = attn(x)
        B, H, W, C = x.shape
        q, k, v = attn.qkv(x).reshape(B, H * W, -1).split([24, 24, 12], dim=-1)
        region = (torch.arange(H)[:, None] // 3 * 2 + torch.arange(W)[None, :] // 2).reshape(-1)  # token -> region
        q_r = torch.stack([q[:, region == r].mean(1) for r in range(4)], 1)
        k_r = torch.stack([k[:, region == r].mean(1) for r in range(4)], 1)
        idx = torch.topk(q_r @ k_r.transpose(1, 2), 2, dim=-1).indices
        assert torch.equal(idx, routed['idx'])
        allowed = torch.zeros(B, 4, 4, dtype=torch.bool).scatter_(2, idx, True)
        mask = allowed[:, region][:, :, region]  # [B, N, N]
        qh, kh, vh = (t.reshape(B, H * W, 3, -1).transpose(1, 2) for t in (q, k, v))
        logits = (qh @ kh.transpose(-1, -2)) * 24 ** -0.5
        dense = logits.masked_fill(~mask[:, None], float('-inf')).softmax(-1) @ vh
        dense = dense.transpose(1, 2).reshape(B, H, W, C)
        lepe = attn.lepe(v.reshape(B, H, W, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        torch.testing.assert_close(out, attn.proj(dense + lepe), rtol=1e-12, atol=1e-12)


def test_routing_gets_no_gradient():
    """Routing is hard and detached (as the original's diff_routing=False): the region descriptors fed to the
    router receive no gradient, the routing logits do not require grad; q/k/v still learn through attention."""
    model = timm.create_model('test_biformer').train()
    captured = []
    router = model.stages[0].blocks[0].attn.router
    router.register_forward_hook(lambda m, i, o: captured.append(i))
    out = model(torch.randn(1, 3, 64, 64))
    q_regions, k_regions = captured[0]
    assert q_regions.requires_grad and k_regions.requires_grad  # means of q/k, which do depend on parameters
    grads = torch.autograd.grad(out.sum(), [q_regions, k_regions], allow_unused=True, retain_graph=True)
    assert grads == (None, None)
    assert not router.logits(q_regions, k_regions).requires_grad
    out.sum().backward()
    assert model.stages[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_router():
    router = RegionRouter(topk=2, scale=0.5)
    q = torch.tensor([[[1., 0.], [0., 1.], [1., 1.]]])
    k = torch.tensor([[[2., 0.], [0., 3.], [1., -1.]]])
    torch.testing.assert_close(router.logits(q, k), 0.5 * q @ k.transpose(1, 2))
    assert router(q, k).tolist() == [[[0, 2], [1, 0], [1, 0]]]


def test_timm_contract_pieces():
    model = timm.create_model('test_biformer', drop_path_rate=0.2)
    assert model.no_weight_decay() == set()
    assert model.group_matcher()['stem'] == r'^stem'
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    x = torch.randn(1, 3, 64, 64)
    model(x).sum().backward()
    assert model.stages[1].blocks[0].attn.qkv.weight.grad is not None
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3
    model.reset_classifier(0, '')
    assert model(x).shape == (1, 64, 2, 2)
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, 'drop_prob') else 0.
             for s in model.stages for b in s.blocks]
    assert rates[0] == 0. and abs(rates[-1] - 0.2) < 1e-6


def test_autocast_bf16():
    model = timm.create_model('test_biformer').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        out = model(x)
    with torch.no_grad():
        ref = model(x)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 5e-2


def test_bad_input():
    model = timm.create_model('test_biformer').eval()
    with pytest.raises(ValueError, match='NCHW'):
        model(torch.randn(2, 64, 64))
    with pytest.raises(ValueError, match='in_chans=3'):
        model(torch.randn(1, 64, 64, 3))  # NHWC
    with pytest.raises(ValueError, match=r'topk must lie in \[1, n_win \*\* 2 = 4\]'):
        BiLevelRoutingAttention(16, 2, n_win=2, topk=5)
    with pytest.raises(ValueError, match='divisible by num_heads'):
        BiLevelRoutingAttention(16, 3, n_win=2, topk=1)
    with pytest.raises(ValueError, match='bra_impl'):
        BiLevelRoutingAttention(16, 2, bra_impl='cuda')
    with pytest.raises(ValueError, match='at least head_dim'):
        BiFormer(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), head_dim=32, topks=(1, 1, 1, -2))
    with pytest.raises(ValueError, match='one value per stage'):
        BiFormer(embed_dims=(16, 32, 48), depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match='lepe_source'):
        BiFormer(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), head_dim=8, global_lepe='output')


def test_converter_rejects_bad_arguments():
    kwargs = dict(depth=[1, 1, 1, 1], embed_dim=[16, 32, 48, 64], qk_dims=[16, 32, 48, 64], head_dim=8,
                  kv_downsample_mode='identity', topks=[1, 2, 4, -2], mlp_ratios=[2] * 4)
    cls = 'models/biformer.py:BiFormer'
    with pytest.raises(ValueError, match=r"does not know: \['window_size'\]"):
        build_from_official('biformer', cls, dict(kwargs, window_size=7))
    with pytest.raises(ValueError, match='official_class for biformer'):
        build_from_official('biformer', 'models/swin.py:Swin', kwargs)
    with pytest.raises(ValueError, match='ada_avgpool'):
        build_from_official('biformer', cls, {k: v for k, v in kwargs.items() if k != 'kv_downsample_mode'})
    with pytest.raises(ValueError, match='kv_downsample_mode'):
        build_from_official('biformer', cls, dict(kwargs, kv_downsample_mode='avgpool'))
    with pytest.raises(ValueError, match='soft_routing'):
        build_from_official('biformer', cls, dict(kwargs, soft_routing=True))
    with pytest.raises(ValueError, match='qk_dims'):
        build_from_official('biformer', cls, {k: v for k, v in kwargs.items() if k != 'qk_dims'})
    with pytest.raises(ValueError, match='topks'):
        build_from_official('biformer', cls, dict(kwargs, topks=[1, 2, 0, -2]))
    with pytest.raises(ValueError, match='topks of nchwBiFormerSTL'):
        build_from_official('biformer', 'models/biformer_stl_nchw.py:nchwBiFormerSTL', dict(topks=(1, 4, 16, -2)))
    # the original's options that are implemented: layer scale, attention without LePE, auto_pad, qk_scale
    model = build_from_official('biformer', cls, dict(kwargs, layer_scale_init_value=0.5, topks=[1, 2, -1, -1],
                                                      auto_pad=True, qk_scale=0.25))
    assert model.stages[0].blocks[0].ls1.gamma.eq(0.5).all()
    assert model.stages[2].blocks[0].attn.lepe is None and model.stages[0].blocks[0].attn.scale == 0.25
    assert model.stages[0].blocks[0].attn.auto_pad
