# VCMamba Semantic FPN recipe (Wertyuui345/VCMamba segmentation/configs/sem_fpn): 40k iterations, AdamW 2e-4, wd 1e-4,
# poly 0.9 to 0, 8x4, drop path 0.2, whole network synchronised BN; the position embedding is stored for 512
# (resized correctly on load: the original's loader scrambles it); slide inference with 512 windows, stride 341.
_base_ = ['./_base_/fpn.py']

model = dict(
    backbone=dict(
        type='VCMambaBackbone',
        model_name='vcmamba_base',
        drop_path_rate=0.2,
        model_kwargs=dict(img_size=512)),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)),
    neck=dict(in_channels=[64, 128, 320, 512]))
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=0.0002, weight_decay=0.0001))
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=40000, by_epoch=False)]
train_cfg = dict(max_iters=40000, val_interval=4000)
default_hooks = dict(checkpoint=dict(interval=4000))
train_dataloader = dict(batch_size=4)  # 8 GPUs x 4
sync_bn = 'torch'
