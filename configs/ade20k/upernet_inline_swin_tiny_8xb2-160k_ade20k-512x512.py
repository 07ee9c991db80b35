# InLine-Swin: no segmentation code or weights were released (the paper reports UperNet on ADE20K). This is the
# host's recipe, mmsegmentation's Swin UperNet (swin-*_upernet_8xb2-160k_ade20k-512x512.py): AdamW 6e-5, wd 0.01
# (none on norms, position tables), warmup 1500, poly 1.0, drop path 0.3, 8x2. The model is scaled to 512 crops
# the way the authors scaled it to 384 (window 96): window 128, so the InLine blocks stay global and the softmax
# window is max(7, 128 // 8) = 16, its bias tables resized on load; inference slides 512 windows (stride 341).
_base_ = ['./_base_/upernet.py']

model = dict(
    backbone=dict(
        type='InLineSwinBackbone',
        model_name='inline_swin_tiny',
        drop_path_rate=0.3,
        size_divisor=512,
        model_kwargs=dict(img_size=512, window_size=128)),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'relative_position_bias_table': dict(decay_mult=0.), 'absolute_pos_embed': dict(decay_mult=0.)}))
