"""mmsegmentation integration: backbones in the registry, the ADE20K configs, and train/test tools end to end."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip('mmseg', reason='needs the seg extra (mmsegmentation)')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402

import visionmix.segmentation  # noqa: E402,F401
from visionmix.segmentation import FAMILY_BACKBONES  # noqa: E402
from visionmix.segmentation.synthetic import write_synthetic_ade20k  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / 'configs' / 'ade20k').glob('*.py'))
sys.path.insert(0, str(REPO / 'tools'))
init_default_scope('mmseg')  # what mmengine's Runner sets from the configs' default_scope


def test_every_family_is_registered():
    expected = {'NATBackbone', 'DiNATBackbone', 'L2ViTBackbone', 'MAViTBackbone', 'RAVLTBackbone', 'BiFormerBackbone',
                'VCMambaBackbone', 'InLineDeiTBackbone', 'InLinePVTBackbone', 'InLineSwinBackbone',
                'InLineCSwinBackbone', 'GRATViTBackbone'}
    assert set(FAMILY_BACKBONES) == expected
    for name in expected | {'TimmFeatureBackbone'}:
        assert MODELS.get(name) is not None
    # every family has at least one ADE20K config
    types = {re.search(r"type='(\w+Backbone)'", p.read_text()).group(1) for p in CONFIGS}
    assert types == expected


def test_mmcv_lite_stub_raises_clearly():
    from mmcv.ops import nms
    if not getattr(sys.modules['mmcv._ext'], '__visionmix_stub__', False):
        pytest.skip('a compiled mmcv is installed')
    with pytest.raises(NotImplementedError, match='mmcv-lite'):
        nms(torch.rand(3, 4), torch.rand(3), 0.5)


@pytest.mark.parametrize('name', ['test_nat', 'test_dinat', 'test_l2vit', 'test_mavit', 'test_ravlt', 'test_biformer',
                                  'test_vcmamba', 'test_inline_pvt', 'test_inline_cswin', 'test_inline_deit'])
def test_backbone_returns_nchw_maps(name):
    family = next(cls for cls in FAMILY_BACKBONES.values() if cls.accepts(name))
    backbone = family(model_name=name, out_indices=(0, 1, 2, 3)).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        outs = backbone(x)
        ref = backbone.model(x)
    assert len(outs) == 4
    for out, r, c, s in zip(outs, ref, backbone.channels, backbone.reductions):
        assert out.shape == (2, c, 96 // s, 128 // s)
        r = r.permute(0, 3, 1, 2) if backbone.channels_last else r
        if backbone.out_norms is None:
            torch.testing.assert_close(out, r)
        else:  # a LayerNorm over channels at every position
            mean, var = r.mean(1, keepdim=True), r.var(1, unbiased=False, keepdim=True)
            torch.testing.assert_close(out, (r - mean) / torch.sqrt(var + backbone.out_norms[0].eps))


def test_size_divisor_pads_and_crops():
    backbone = FAMILY_BACKBONES['InLineSwinBackbone'](model_name='test_inline_swin', size_divisor=128).eval()
    x = torch.randn(1, 3, 100, 70)
    with torch.no_grad():
        outs = backbone(x)
        padded = backbone.model(torch.nn.functional.pad(x, (0, 58, 0, 28)))
    for i, (out, ref, s) in enumerate(zip(outs, padded, backbone.reductions)):
        assert out.shape[-2:] == (-(-100 // s), -(-70 // s))
        with torch.no_grad():
            torch.testing.assert_close(out, backbone.out_norms[i](ref[..., :out.shape[-2], :out.shape[-1]]))


def test_grat_grid_follows_the_input():
    backbone = FAMILY_BACKBONES['GRATViTBackbone'](model_name='test_vit_grat', out_indices=(1, 3, 5), size_divisor=32,
                                                   model_kwargs=dict(dynamic_img_size=True)).eval()
    with torch.no_grad():
        for hw in [(64, 96), (96, 64), (50, 70)]:
            outs = backbone(torch.randn(1, 3, *hw))
            assert outs[0].shape[-2:] == (-(-hw[0] // 16), -(-hw[1] // 16))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match='model_name'):
        FAMILY_BACKBONES['NATBackbone'](model_name='biformer_tiny')
    with pytest.raises(ValueError, match='size_divisor'):
        FAMILY_BACKBONES['NATBackbone'](model_name='test_nat', size_divisor=0)


def test_pretrained_weights_reach_the_backbone(tmp_path):
    """A local weights file goes through the model's own loader: the backbone holds exactly those weights."""
    import timm
    source = timm.create_model('test_mavit').eval()
    path = tmp_path / 'weights.pth'
    torch.save(source.state_dict(), path)
    backbone = FAMILY_BACKBONES['MAViTBackbone'](model_name='test_mavit', checkpoint=str(path), out_norm=False)
    backbone.init_weights()  # what mmengine's Runner calls: must not re-initialise
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = source.forward_intermediates(x, intermediates_only=True)
        for out, ref in zip(backbone.eval()(x), expected, strict=True):
            torch.testing.assert_close(out, ref)
    fresh = FAMILY_BACKBONES['MAViTBackbone'](model_name='test_mavit', out_norm=False).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x)[-1], expected[-1])


@pytest.mark.parametrize('config', CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_with_matching_channels(config):
    """Every ADE20K config parses, builds its full model and runs it on a 512x512 crop (on the meta device: shapes
    and arguments are checked end to end without the compute)."""
    cfg = Config.fromfile(config)
    cfg.model.backbone.pretrained = False
    with torch.device('meta'):
        model = MODELS.build(cfg.model).eval()
    backbone = model.backbone
    expected = cfg.model.neck.in_channels if 'neck' in cfg.model else cfg.model.decode_head.in_channels
    assert list(backbone.channels) == list(expected)
    if 'auxiliary_head' in cfg.model and 'neck' not in cfg.model:
        assert cfg.model.auxiliary_head.in_channels == backbone.channels[cfg.model.auxiliary_head.in_index]
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    assert cfg.train_cfg.max_iters == cfg.param_scheduler[-1]['end']
    with torch.no_grad():
        logits = model(torch.empty(1, 3, 512, 512, device='meta'), mode='tensor')
    assert logits.shape == (1, 150, 128, 128)


def _tiny_cfg(config: Path, data_root: Path, work_dir: Path, backbone: dict, iters: int) -> Path:
    """The config with a tiny backbone, 64-px crops of the synthetic data and a few iterations."""
    cfg = Config.fromfile(config)
    cfg.model.backbone.update(backbone, pretrained=False)
    cfg.model.data_preprocessor.size = (64, 64)
    channels = MODELS.get(cfg.model.backbone.type)(**backbone).channels
    cfg.model.decode_head.update(channels=32, in_channels=channels)
    cfg.model.auxiliary_head.update(channels=16, in_channels=channels[2])
    cfg.train_dataloader.dataset.pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', reduce_zero_label=True),
        dict(type='RandomResize', scale=(128, 64), ratio_range=(0.75, 1.5), keep_ratio=True),
        dict(type='RandomCrop', crop_size=(64, 64), cat_max_ratio=0.75),
        dict(type='RandomFlip', prob=0.5),
        dict(type='PackSegInputs'),
    ]
    cfg.test_dataloader.dataset.pipeline = cfg.val_dataloader.dataset.pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(128, 64), keep_ratio=True),
        dict(type='LoadAnnotations', reduce_zero_label=True),
        dict(type='PackSegInputs'),
    ]
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[key].update(num_workers=0, persistent_workers=False)
    cfg.train_dataloader.batch_size = 4
    cfg.train_cfg.update(max_iters=iters, val_interval=iters)
    cfg.default_hooks.checkpoint.update(interval=iters)
    cfg.default_hooks.logger.update(interval=1)
    cfg.param_scheduler = [dict(type='LinearLR', start_factor=1.0, end_factor=0.5, by_epoch=False, begin=0,
                                end=iters)]
    cfg.optim_wrapper.optimizer.lr = 1e-3
    cfg.randomness = dict(seed=0)
    path = work_dir / 'tiny_config.py'
    cfg.dump(path)
    return path


def test_train_then_test_on_synthetic_ade20k(tmp_path):
    import test_seg
    import train_seg

    data_root = write_synthetic_ade20k(tmp_path / 'data', num_train=8, num_val=4, size=64, num_classes=5)
    config = _tiny_cfg(REPO / 'configs/ade20k/upernet_mavit_tiny_8xb2-160k_ade20k-512x512.py', data_root, tmp_path,
                       dict(model_name='test_mavit'), iters=12)
    work_dir = tmp_path / 'work'
    runner = train_seg.main([str(config), '--work-dir', str(work_dir), '--data-root', str(data_root)])
    assert runner.iter == 12
    checkpoint = work_dir / 'iter_12.pth'
    assert checkpoint.is_file() and (work_dir / 'curves.png').is_file()
    losses = [json.loads(line)['loss'] for line in open(next(work_dir.glob('*/vis_data/scalars.json')))
              if '"loss"' in line]
    assert len(losses) == 12 and min(losses[-3:]) < losses[0]

    # --resume continues from iter_12 (not from scratch) up to the new max_iters
    resumed = train_seg.main([str(config), '--work-dir', str(work_dir), '--data-root', str(data_root), '--resume',
                              '--cfg-options', 'train_cfg.max_iters=14', 'train_cfg.val_interval=14'])
    assert resumed.iter == 14
    steps = [json.loads(line)['step'] for path in sorted(work_dir.glob('*/vis_data/scalars.json'))
             for line in open(path) if '"loss"' in line]
    assert steps == list(range(1, 15))  # one run of 12, then 13 and 14: no iteration trained twice

    out = tmp_path / 'metrics.json'
    metrics = test_seg.main([str(config), str(checkpoint), '--work-dir', str(tmp_path / 'test'), '--data-root',
                             str(data_root), '--out', str(out)])
    assert set(metrics) >= {'mIoU', 'mAcc', 'aAcc'} and 0.0 <= metrics['mIoU'] <= 100.0
    assert json.loads(out.read_text())['metrics']['mIoU'] == metrics['mIoU']


def test_scaled_windows_load_released_layout_weights(tmp_path):
    """The InLine-Swin ADE20K configs enlarge the windows; the softmax blocks' bias tables are resized on load."""
    import timm
    from timm.layers import resize_rel_pos_bias_table
    source = timm.create_model('test_inline_swin')
    path = tmp_path / 'weights.pth'
    torch.save(source.state_dict(), path)
    backbone = FAMILY_BACKBONES['InLineSwinBackbone'](model_name='test_inline_swin', checkpoint=str(path),
                                                      model_kwargs=dict(img_size=256, window_size=64))
    key = 'layers.3.blocks.0.attn.relative_position_bias_table'
    table = source.state_dict()[key]
    resized = backbone.model.state_dict()['model.' + key]
    assert table.shape == (7 * 7, 4) and resized.shape == (15 * 15, 4)  # windows 4 -> 8
    torch.testing.assert_close(resized, resize_rel_pos_bias_table(table, (8, 8), resized.shape))
    with torch.no_grad():
        assert [o.shape[-1] for o in backbone(torch.randn(1, 3, 256, 256))] == [64, 32, 16, 8]


def test_load_config_overrides(tmp_path):
    from visionmix.segmentation.runner import load_config
    config = str(REPO / 'configs/ade20k/upernet_nat_tiny_8xb2-160k_ade20k-512x512.py')
    cfg = load_config(config, data_root=str(tmp_path), no_pretrained=True, amp=False,
                      cfg_options={'train_dataloader.batch_size': 3})
    assert cfg.work_dir == 'work_dirs/upernet_nat_tiny_8xb2-160k_ade20k-512x512'
    assert {cfg[k].dataset.data_root for k in ('train_dataloader', 'val_dataloader', 'test_dataloader')} == {
        str(tmp_path)}
    assert cfg.model.backbone.pretrained is False and cfg.train_dataloader.batch_size == 3
    # the published fp16 recipe (AmpOptimWrapper, static scale 512) needs CUDA; without it training runs in fp32
    expected = 'AmpOptimWrapper' if torch.cuda.is_available() else 'OptimWrapper'
    assert cfg.optim_wrapper.type == expected and ('loss_scale' in cfg.optim_wrapper) == torch.cuda.is_available()
    cfg = load_config(str(REPO / 'configs/ade20k/upernet_l2vit_tiny_8xb2-160k_ade20k-512x512.py'), amp=True)
    assert cfg.optim_wrapper.type == expected
    with pytest.raises(FileNotFoundError, match='config'):
        load_config(str(tmp_path / 'missing.py'))
