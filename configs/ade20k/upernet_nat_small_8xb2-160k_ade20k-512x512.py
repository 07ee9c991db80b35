# NAT/DiNAT UperNet recipe: SHI-Labs/Neighborhood-Attention-Transformer segmentation/configs/nat/upernet_nat_small_512x512_160k_ade20k.py
# (AdamW 6e-5, wd 0.01 without decay on rpb/norm, warmup 1500, poly 1.0, 8x2, fp16).
_base_ = ['./_base_/upernet.py']

model = dict(
    backbone=dict(
        type='NATBackbone',
        model_name='nat_small',
        drop_path_rate=0.5),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
# fp16 with a static loss scale of 512, as the original (mmcv's Fp16OptimizerHook default)
optim_wrapper = dict(type='AmpOptimWrapper', loss_scale=512., paramwise_cfg=dict(custom_keys={'rpb': dict(decay_mult=0.)}))
