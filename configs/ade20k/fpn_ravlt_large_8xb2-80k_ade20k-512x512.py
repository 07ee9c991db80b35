# RALA (RAVLT) Semantic FPN 1x recipe (RAVLT configs FPN_*_1x, mmseg 0.13): 80k, AdamW 1e-4, wd 1e-4, poly 0.9 to 1e-6, 8x2;
# drop path as the classifier's; stem/downsample BN synchronised.
_base_ = ['./_base_/fpn.py']

model = dict(
    backbone=dict(
        type='RAVLTBackbone',
        model_name='ravlt_large',
        drop_path_rate=0.55),
    neck=dict(in_channels=[96, 192, 448, 640]))
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=0.0001, weight_decay=0.0001))
param_scheduler = [dict(type='PolyLR', eta_min=1e-06, power=0.9, begin=0, end=80000, by_epoch=False)]
train_cfg = dict(max_iters=80000, val_interval=8000)
default_hooks = dict(checkpoint=dict(interval=8000))
sync_bn = 'torch'
