# InLine-CSWin: no segmentation code or weights were released. This is the host's recipe, CSWin's UperNet
# (microsoft/CSWin-Transformer segmentation/configs/cswin/upernet_cswin_*.py): AdamW 6e-5, wd 0.01, warmup 1500,
# poly 1.0, 8x2, drop path T/S/B 0.3/0.4/0.6. Stage-3 stripes of width 7 need maps divisible by 7: the input is
# zero-padded to a multiple of 112 (512 -> 560) and the maps cropped back (CSWin pads each stripe instead).
_base_ = ['./_base_/upernet.py']

model = dict(
    backbone=dict(
        type='InLineCSwinBackbone',
        model_name='inline_cswin_small',
        drop_path_rate=0.4,
        size_divisor=112),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
