"""Pretrained timm ViT / DeiT with GRAT attention, training-free.

GRAT: `Grouping First, Attending Smartly: Training-Free Acceleration for Diffusion Transformers`,
https://arxiv.org/abs/2505.14687 (code: https://github.com/OliverRensu/GRAT).

Each model is timm's own ``VisionTransformer`` with the released timm weights of the base model, loaded
unchanged; :func:`visionmix.swap_attention` then replaces every block's attention by GRAT attention that reuses
the same ``qkv``/``proj`` layers. The cls token is a dense block (it sees every patch, every patch sees it).

Defaults at 224 px / patch 16 (a 14x14 patch grid): GRAT-X on 2x2-patch groups, so a patch attends to its
2-patch-wide row and column bands (13 of 49 groups) plus the cls token. Override with ``grat_mode``
(``'X'`` | ``'B'``), ``grat_group_size``, ``grat_radius`` and ``grat_blocks`` (block indices to swap) in
``timm.create_model``. The weights were trained with dense attention: expect lower accuracy than the base
model unless fine-tuned; with a pattern that covers every group the outputs equal the base model's.
"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

from visionmix.adapters.swap import swap_attention

GRAT_OPTIONS = {'grat_group_size': 'group_size', 'grat_mode': 'mode', 'grat_radius': 'radius',
                'grat_blocks': 'blocks'}


def _cfg(hf_hub_id: str = '', **kwargs):
    return {
        'url': '', 'hf_hub_id': hf_hub_id,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_INCEPTION_MEAN, 'std': IMAGENET_INCEPTION_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', 'license': 'apache-2.0',
        'paper_ids': ['arXiv:2505.14687', 'arXiv:2010.11929'],
        'notes': ('weights of the dense base model, unchanged (GRAT is training-free)',),
        **kwargs,
    }


_DEIT = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, paper_ids=['arXiv:2505.14687', 'arXiv:2012.12877'],
             origin_url='https://github.com/facebookresearch/deit')

default_cfgs = generate_default_cfgs({
    'vit_base_patch16_224_grat.augreg2_in21k_ft_in1k': _cfg('timm/vit_base_patch16_224.augreg2_in21k_ft_in1k'),
    'vit_base_patch16_224_grat.augreg_in21k_ft_in1k': _cfg('timm/vit_base_patch16_224.augreg_in21k_ft_in1k'),
    'deit_small_patch16_224_grat.fb_in1k': _cfg('timm/deit_small_patch16_224.fb_in1k', **_DEIT),
    'test_vit_grat': _cfg(input_size=(3, 160, 160), crop_pct=0.95, notes=()),
})


def _create_grat_vit(variant: str, pretrained: bool = False, grat_defaults: dict = None, **kwargs) -> VisionTransformer:
    grat = dict(grat_defaults or {})
    grat.update({GRAT_OPTIONS[k]: kwargs.pop(k) for k in list(kwargs) if k in GRAT_OPTIONS})
    model = _create_vision_transformer(variant, pretrained=pretrained, use_naflex=False, **kwargs)
    return swap_attention(model, 'grat', **grat)


@register_model
def vit_base_patch16_224_grat(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16 at 224 px (timm weights) with GRAT-X attention on 2x2-patch groups."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_grat_vit('vit_base_patch16_224_grat', pretrained, dict(group_size=2, mode='X'),
                            **dict(model_args, **kwargs))


@register_model
def deit_small_patch16_224_grat(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-S/16 at 224 px (the released DeiT weights) with GRAT-X attention on 2x2-patch groups."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_grat_vit('deit_small_patch16_224_grat', pretrained, dict(group_size=2, mode='X'),
                            **dict(model_args, **kwargs))


@register_model
def test_vit_grat(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Tiny ViT for tests (timm's ``test_vit`` sizes) with GRAT-B attention, 2x2-patch groups, radius 1."""
    model_args = dict(patch_size=16, embed_dim=64, depth=6, num_heads=2, mlp_ratio=3, dynamic_img_size=True)
    return _create_grat_vit('test_vit_grat', pretrained, dict(group_size=2, mode='B', radius=1),
                            **dict(model_args, **kwargs))
