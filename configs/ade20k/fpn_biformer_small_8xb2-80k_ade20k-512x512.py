# BiFormer Semantic FPN recipe (rayleizhu/BiFormer semantic_segmentation/configs/ade20k/sfpn.biformer_small.py): 80k, AdamW
# 2e-4, wd 1e-4, cosine schedule, 8x2; n_win=8. (The original resizes test images to multiples of 32 with AlignResize;
# here they keep their size, which the backbone pads internally.)
_base_ = ['./_base_/fpn.py']

model = dict(
    backbone=dict(
        type='BiFormerBackbone',
        model_name='biformer_small',
        drop_path_rate=0.15,
        model_kwargs=dict(n_win=8)),
    neck=dict(in_channels=[64, 128, 256, 512]))
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=0.0002, weight_decay=0.0001))
param_scheduler = [dict(type='CosineAnnealingLR', T_max=80000, eta_min=0.0, begin=0, end=80000, by_epoch=False)]
train_cfg = dict(max_iters=80000, val_interval=8000)
default_hooks = dict(checkpoint=dict(interval=8000))
sync_bn = 'torch'
