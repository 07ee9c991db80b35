# RALA (RAVLT) UperNet 2x recipe (RAVLT configs Uper*_2x, mmseg 0.13): 160k, AdamW 6e-5, wd 0.01 (none on norms), warmup 1500,
# poly 1.0, fp16 loss scale 512, 8x2 (L: 8x1); drop path as the classifier's; stem/downsample BN synchronised.
_base_ = ['./_base_/upernet.py']

model = dict(
    backbone=dict(
        type='RAVLTBackbone',
        model_name='ravlt_base',
        drop_path_rate=0.4),
    decode_head=dict(in_channels=[96, 192, 384, 512]),
    auxiliary_head=dict(in_channels=384))
# fp16 with a static loss scale of 512, as the original (mmcv's Fp16OptimizerHook default)
optim_wrapper = dict(type='AmpOptimWrapper', loss_scale=512.)
sync_bn = 'torch'
