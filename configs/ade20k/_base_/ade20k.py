# ADE20K with a visionmix backbone: mmsegmentation's own dataset and runtime bases, the import that registers the
# backbones, and the encoder-decoder (preprocessing, backbone) the UperNet and Semantic FPN bases add heads to.
_base_ = ['mmseg::_base_/datasets/ade20k.py', 'mmseg::_base_/default_runtime.py']
custom_imports = dict(imports=['visionmix.segmentation'], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(type='TimmFeatureBackbone', pretrained=True, out_indices=(0, 1, 2, 3)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
