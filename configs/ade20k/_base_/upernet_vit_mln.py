# UperNet for plain (isotropic) ViTs on ADE20K: the outputs of blocks 3, 6, 9 and 12 rescaled by a MultiLevelNeck
# (x4, x2, x1, x0.5) into a pyramid, as mmsegmentation's DeiT / ViT UperNet configs do.
_base_ = ['./upernet.py']

model = dict(
    backbone=dict(out_indices=(2, 5, 8, 11), size_divisor=16),
    neck=dict(type='MultiLevelNeck', scales=[4, 2, 1, 0.5]))
optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={
        'pos_embed': dict(decay_mult=0.),
        'cls_token': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.),
    }))
