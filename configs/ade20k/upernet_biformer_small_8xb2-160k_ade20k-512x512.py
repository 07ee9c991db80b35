# BiFormer UperNet recipe (rayleizhu/BiFormer semantic_segmentation/configs/ade20k/upernet.biformer_small.py): 160k, AdamW 6e-5,
# wd 0.01, warmup 1500, poly 1.0, 8x2, fp16 loss scale 512; n_win=8 regions per side at 512 (auto_pad).
_base_ = ['./_base_/upernet.py']

model = dict(
    backbone=dict(
        type='BiFormerBackbone',
        model_name='biformer_small',
        drop_path_rate=0.3,
        model_kwargs=dict(n_win=8)),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
# fp16 with a static loss scale of 512, as the original (mmcv's Fp16OptimizerHook default)
optim_wrapper = dict(type='AmpOptimWrapper', loss_scale=512.)
sync_bn = 'torch'
