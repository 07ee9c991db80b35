# InLine-DeiT: no segmentation code or weights were released. This is the host's recipe, mmsegmentation's DeiT UperNet
# with a MultiLevelNeck (vit/vit_deit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py): AdamW 6e-5, wd 0.01, warmup
# 1500, poly 1.0, drop path 0.1, 8x2.
_base_ = ['./_base_/upernet_vit_mln.py']

model = dict(
    backbone=dict(
        type='InLineDeiTBackbone',
        model_name='inline_deit_small',
        drop_path_rate=0.1),
    neck=dict(in_channels=[320, 320, 320, 320], out_channels=320),
    decode_head=dict(in_channels=[320, 320, 320, 320]),
    auxiliary_head=dict(in_channels=320))
