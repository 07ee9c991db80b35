# NAT/DiNAT UperNet recipe: SHI-Labs/Neighborhood-Attention-Transformer segmentation/configs/dinat/upernet_dinat_small_512x512_160k_ade20k.py
# The dilations are the original's for 512x512 inputs (the classifiers' are for 224).
_base_ = ['./_base_/upernet.py']

model = dict(
    backbone=dict(
        type='DiNATBackbone',
        model_name='dinat_small',
        drop_path_rate=0.5,
        model_kwargs=dict(dilations=[[1, 16, 1], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4, 1, 2, 1, 3, 1, 4, 1, 2, 1, 3, 1, 4], [1, 2, 1, 2, 1]])),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
# fp16 with a static loss scale of 512, as the original (mmcv's Fp16OptimizerHook default)
optim_wrapper = dict(type='AmpOptimWrapper', loss_scale=512., paramwise_cfg=dict(custom_keys={'rpb': dict(decay_mult=0.)}))
