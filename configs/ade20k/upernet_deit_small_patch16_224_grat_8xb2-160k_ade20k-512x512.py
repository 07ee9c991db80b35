# GRAT attention in a DeiT-S: GRAT has no segmentation recipe. This is the host's, mmsegmentation's vit/vit_deit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py
# (AdamW 6e-5, wd 0.01, warmup 1500, poly 1.0, drop path 0.1, 8x2). The 2x2-patch groups need an even patch grid:
# inputs are padded to a multiple of 32 and the GRAT grid follows each input.
_base_ = ['./_base_/upernet_vit_mln.py']

model = dict(
    backbone=dict(
        type='GRATViTBackbone',
        model_name='deit_small_patch16_224_grat',
        drop_path_rate=0.1,
        size_divisor=32,
        model_kwargs=dict(dynamic_img_size=True)),
    neck=dict(in_channels=[384, 384, 384, 384], out_channels=384),
    decode_head=dict(in_channels=[384, 384, 384, 384]),
    auxiliary_head=dict(in_channels=384))
