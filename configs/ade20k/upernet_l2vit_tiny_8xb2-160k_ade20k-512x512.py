# L2ViT UperNet recipe (ChuanyangZheng/L2ViT segmentation configs): 160k, AdamW 6e-5, wd 0.01, warmup 1500, poly 1.0,
# 8x2, drop path 0.3, fp32; aux FCN on stage 3. The original wrapper always uses window 7 (as these models do).
_base_ = ['./_base_/upernet.py']

model = dict(
    backbone=dict(
        type='L2ViTBackbone',
        model_name='l2vit_tiny',
        drop_path_rate=0.3),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
