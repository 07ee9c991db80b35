"""NAT / DiNAT: parity with the original code, converter on the released layouts, timm contract, bad input."""
import json

import pytest
import timm
import torch

import visionmix  # noqa: F401
from tests.conftest import parity_dir, parity_error, parity_files
from visionmix.convert import build_from_official
from visionmix.models.nat import NAT, checkpoint_filter_fn

RELEASED = {  # name -> parameter count of the released checkpoint
    'nat_mini': 19_984_174, 'nat_tiny': 27_901_582, 'nat_small': 50_743_297, 'nat_base': 89_769_652,
    'dinat_mini': 19_984_174, 'dinat_tiny': 27_901_582, 'dinat_small': 50_719_681, 'dinat_base': 89_769_652,
}


@pytest.mark.parametrize('path', parity_files('nat') + parity_files('dinat'))
def test_parity_with_original(path):
    case = torch.load(path, weights_only=True)
    model = build_from_official(case['family'], case['official_class'], case['official_kwargs'],
                                case['state_dict']).double()
    x = case['input'].double()
    with torch.no_grad():
        out = model(x)
        final, stages = model.forward_intermediates(x, output_fmt='NHWC')
    assert parity_error(out, case['output']) < 1e-6
    for name, ref in zip(case.get('feature_names', []), case.get('features', [])):
        level = int(name.split('.')[1])  # 'levels.{i}.blocks.{-1}': the stage output before downsampling
        assert parity_error(stages[level], ref) < 1e-6, name
    assert torch.equal(final, model.forward_features(x))


def _manifests():
    files = sorted(parity_dir().glob('*nat/manifest_*.json'))
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f'no manifests under {parity_dir()}'))]
    return [pytest.param(f, id=f.stem.removeprefix('manifest_')) for f in files]


@pytest.mark.parametrize('path', _manifests())
def test_converter_accepts_released_layout(path):
    manifest = json.loads(path.read_text())
    family = 'dinat' if manifest['variant'].startswith('dinat') else 'nat'
    official_class = manifest['official_class']
    with torch.device('meta'):
        state_dict = {k: torch.empty(shape) for k, shape in manifest['keys'].items()}
        model = build_from_official(family, official_class, manifest['official_kwargs'], state_dict)
    assert sum(p.numel() for p in model.parameters()) == manifest['num_params']
    # the registered variant builds the same architecture as the original factory
    with torch.device('meta'):
        registered = timm.create_model(manifest['variant'])
    assert {k: v.shape for k, v in registered.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}
    assert registered.stages[0].blocks[1].attn.dilation == model.stages[0].blocks[1].attn.dilation


@pytest.mark.parametrize('name', sorted(RELEASED) + ['dinat_large'])
def test_registered_param_counts(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    expected = RELEASED.get(name, 200_943_514)  # dinat_large: 200.9M as released
    assert sum(p.numel() for p in model.parameters()) == expected


def test_registered_names_and_pretrained_cfgs():
    names = set(timm.list_models(module='nat'))
    assert {'nat_mini', 'nat_tiny', 'nat_small', 'nat_base', 'dinat_mini', 'dinat_tiny', 'dinat_small',
            'dinat_base', 'dinat_large', 'dinat_large_384', 'dinat_large_384_11x11', 'test_nat',
            'test_dinat'} <= names
    for name in timm.list_pretrained('*nat*'):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url.startswith('https://shi-labs.com/projects/'), name
        assert cfg.license == 'mit' and cfg.paper_ids
    assert timm.models.get_pretrained_cfg('dinat_large.in22k').num_classes == 21841


def test_dinat_dilations_follow_release():
    with torch.device('meta'):
        m224, m384 = timm.create_model('dinat_tiny'), timm.create_model('dinat_large_384')
    dil = lambda m, i: [b.attn.dilation[0] for b in m.stages[i].blocks]
    assert dil(m224, 0) == [1, 8, 1] and dil(m224, 1) == [1, 4, 1, 4] and dil(m224, 2) == [1, 2] * 9
    assert dil(m224, 3) == [1] * 5
    assert dil(m384, 0) == [1, 13, 1] and dil(m384, 2) == [1, 3] * 9


def test_pretrained_loading_through_timm(tmp_path):
    """Original-layout weights load with timm's pretrained path (checkpoint_filter_fn) and reproduce the original."""
    files = sorted((parity_dir() / 'nat').glob('nat_small*.pt'))
    if not files:
        pytest.skip(f'no nat_small parity fixture under {parity_dir()} (set VISIONMIX_PARITY_DIR)')
    case = torch.load(files[0], weights_only=True)
    path = tmp_path / 'nat_small_original.pth'
    torch.save(case['state_dict'], path)  # released NAT checkpoints are a bare state_dict
    kw = case['official_kwargs']
    model = timm.create_model(
        'nat_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=kw['num_classes']),
        embed_dim=kw['embed_dim'], depths=kw['depths'], num_heads=kw['num_heads'], mlp_ratio=kw['mlp_ratio'],
        num_classes=kw['num_classes']).double().eval()
    with torch.no_grad():
        assert parity_error(model(case['input'].double()), case['output']) < 1e-6
    # loading an already-converted state dict is a no-op
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()


@pytest.mark.parametrize('name', ['test_nat', 'test_dinat'])
def test_forward_backward_non_square(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    x = torch.randn(2, 3, 96, 160)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.stages[0].blocks[0].attn.rpb.grad.abs().sum() > 0
    feats = model.forward_features(x)
    assert feats.shape == (2, 3, 5, model.num_features)  # NHWC, stride 32


def test_features_only_and_intermediates():
    model = timm.create_model('test_dinat', features_only=True).eval()
    x = torch.randn(1, 3, 128, 160)
    feats = model(x)
    assert [f.shape[1:3] for f in feats] == [(32, 40), (16, 20), (8, 10), (4, 5)]
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    full = timm.create_model('test_dinat').eval()
    final, inter = full.forward_intermediates(x, indices=(1, 3))
    assert [t.shape for t in inter] == [(1, 32, 16, 20), (1, 128, 4, 5)]  # NCHW by default
    assert torch.allclose(final, full.forward_features(x))
    full.prune_intermediate_layers(indices=(0, 1), prune_norm=True)
    assert len(full.stages) == 2


def test_timm_contract_pieces():
    model = timm.create_model('test_nat', drop_path_rate=0.2)
    assert all(n.endswith('.rpb') for n in model.no_weight_decay()) and model.no_weight_decay()
    matcher = model.group_matcher()
    assert matcher['stem'] == r'^stem'
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3
    model.reset_classifier(0, '')
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 3, 3, 128)


def test_torch_compile_fullgraph_model():
    torch.manual_seed(0)
    model = timm.create_model('test_dinat').eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True)(x)
        ref = model(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_autocast_bf16():
    model = timm.create_model('test_nat').eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        out = model(x)
    with torch.no_grad():
        ref = model(x)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 5e-2


def test_rejects_too_small_input():
    model = timm.create_model('test_dinat').eval()
    with pytest.raises(ValueError, match=r'kernel_size \* dilation must not exceed the input size'):
        model(torch.randn(1, 3, 64, 64))  # stage 0 is 16x16 but a DiNA layer needs 3 * 8 = 24


def test_model_rejects_wrong_layout():
    attn = timm.create_model('test_nat').stages[0].blocks[0].attn
    with pytest.raises(ValueError, match='channels-last'):
        attn(torch.randn(2, 16, 16))  # [B, N, C]: a 1-D map given to 2-D attention


def test_converter_rejects_unknown_arguments():
    with pytest.raises(ValueError, match='family must be one of'):
        build_from_official('natt', 'classification/nat.py:NAT', {})
    with pytest.raises(ValueError, match=r"does not know: \['window_size'\]"):
        build_from_official('nat', 'classification/nat.py:NAT', {'window_size': 7})
    with pytest.raises(ValueError, match='official_class for nat/dinat'):
        build_from_official('nat', 'models/swin.py:Swin', {})
    with pytest.raises(ValueError, match='dilations'):
        NAT(depths=(1, 1), num_heads=(1, 2), dilations=[[1]])
