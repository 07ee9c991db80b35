# UperNet on ADE20K, 512x512 crops: the head, data pipeline and runtime shared by every UperNet config here.
# Data pipeline, runtime and 160k-iteration loop are mmsegmentation's own base files; the backbone comes from
# visionmix.segmentation (imported in ./ade20k.py), so the family configs only name the model and their recipe.
_base_ = ['./ade20k.py', 'mmseg::_base_/schedules/schedule_160k.py']
norm_cfg = dict(type='SyncBN', requires_grad=True)  # reverted to BN by mmengine when not distributed
model = dict(
    decode_head=dict(
        type='UPerHead',
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)))

# AdamW 6e-5, wd 0.01 without decay on norms; 1500 linear warmup iterations, then poly (power 1) to zero.
optim_wrapper = dict(
    _delete_=True,  # mmseg's schedule base uses SGD
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]

# 8 GPUs x 2 images per GPU
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
