# GRAT attention in a ViT-B: GRAT has no segmentation recipe. This is the host's, mmsegmentation's vit/vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512.py
# (AdamW 6e-5, wd 0.01, warmup 1500, poly 1.0, drop path 0.0, 8x2). The 2x2-patch groups need an even patch grid:
# inputs are padded to a multiple of 32 and the GRAT grid follows each input.
_base_ = ['./_base_/upernet_vit_mln.py']

model = dict(
    backbone=dict(
        type='GRATViTBackbone',
        model_name='vit_base_patch16_224_grat',
        drop_path_rate=0.0,
        size_divisor=32,
        model_kwargs=dict(dynamic_img_size=True)),
    neck=dict(in_channels=[768, 768, 768, 768], out_channels=768),
    decode_head=dict(in_channels=[768, 768, 768, 768]),
    auxiliary_head=dict(in_channels=768))
