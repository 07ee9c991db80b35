# InLine-PVT: no segmentation code or weights were released (the paper reports Semantic FPN on ADE20K). This is the
# host's recipe, PVT's Semantic FPN (whai362/PVT segmentation, fpn_pvt_*_ade20k_40k.py): 40k iterations, batch 16,
# AdamW 1e-4, wd 1e-4, poly 0.9, drop path 0.1.
_base_ = ['./_base_/fpn.py']

model = dict(
    backbone=dict(
        type='InLinePVTBackbone',
        model_name='inline_pvt_medium',
        drop_path_rate=0.1),
    neck=dict(in_channels=[64, 128, 320, 512]))
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=0.0001, weight_decay=0.0001))
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=40000, by_epoch=False)]
train_cfg = dict(max_iters=40000, val_interval=4000)
default_hooks = dict(checkpoint=dict(interval=4000))
