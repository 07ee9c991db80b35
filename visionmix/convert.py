"""Build visionmix models from the original authors' classes, configs and checkpoints.

``build_from_official(family, official_class, official_kwargs, state_dict=None)`` returns the
visionmix model equivalent to ``official_class(**official_kwargs)``, with ``state_dict`` (in the
original layout) converted and loaded strictly, in eval mode.
"""
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

__all__ = ['build_from_official', 'official_families']

Converter = Callable[[str, Dict[str, Any]], Tuple[Callable[..., nn.Module], Dict[str, Any], Callable]]


def _take(kwargs: Dict[str, Any], mapping: Mapping[str, str], family: str) -> Dict[str, Any]:
    unknown = sorted(set(kwargs) - set(mapping))
    if unknown:
        raise ValueError(f"official_kwargs for {family!r} has arguments visionmix does not know: {unknown}; "
                         f"known: {sorted(mapping)}")
    return {mapping[k]: v for k, v in kwargs.items() if mapping[k]}


_NAT_KWARGS = {
    'in_chans': 'in_chans', 'num_classes': 'num_classes', 'embed_dim': 'embed_dim', 'depths': 'depths',
    'num_heads': 'num_heads', 'kernel_size': 'kernel_size', 'dilations': 'dilations', 'mlp_ratio': 'mlp_ratio',
    'qkv_bias': 'qkv_bias', 'qk_scale': 'qk_scale', 'layer_scale': 'ls_init_value', 'drop_rate': 'proj_drop_rate',
    'drop_path_rate': 'drop_path_rate', 'attn_drop_rate': '', 'norm_layer': '',
}


def _nat(official_class: str, kwargs: Dict[str, Any]):
    from visionmix.models.nat import NAT, checkpoint_filter_fn
    cls_name = official_class.rsplit(':', 1)[-1].rsplit('.', 1)[-1]
    if cls_name not in ('NAT', 'DiNAT'):
        raise ValueError(f"official_class for nat/dinat must be classification/nat.py:NAT or "
                         f"classification/dinat.py:DiNAT, got {official_class!r}")
    if kwargs.get('attn_drop_rate', 0.0):
        warnings.warn('attn_drop_rate is not applied: the fused neighborhood-attention kernels have no attention '
                      'dropout (it has no effect in eval mode)')
    norm_layer = kwargs.get('norm_layer', nn.LayerNorm)
    if norm_layer not in (nn.LayerNorm, 'LayerNorm', None):
        raise ValueError(f"norm_layer must be nn.LayerNorm for NAT/DiNAT, got {norm_layer!r}")
    args = _take(kwargs, _NAT_KWARGS, 'nat')
    # the original treats a non-numeric layer_scale as "no layer scale"
    if not isinstance(args.get('ls_init_value'), (int, float)) or isinstance(args.get('ls_init_value'), bool):
        args['ls_init_value'] = None
    if 'num_heads' in args:
        args['num_heads'] = tuple(args['num_heads'])
    if 'depths' in args:
        args['depths'] = tuple(args['depths'])
    return NAT, args, checkpoint_filter_fn


def _from_module(module: str) -> Converter:
    """A family whose model file defines ``convert_official(official_class, official_kwargs)`` returning
    ``(model_class, model_kwargs, checkpoint_filter_fn)``; imported on first use."""
    def convert(official_class: str, kwargs: Dict[str, Any]):
        import importlib
        return importlib.import_module(module).convert_official(official_class, kwargs)
    return convert


_FAMILIES: Dict[str, Converter] = {
    'nat': _nat,
    'dinat': _nat,
    'mala': _from_module('visionmix.models.mala'),
    'rala': _from_module('visionmix.models.mala'),
    'inline': _from_module('visionmix.models.inline'),
    'l2vit': _from_module('visionmix.models.l2vit'),
    'biformer': _from_module('visionmix.models.biformer'),
    'vcmamba': _from_module('visionmix.models.vcmamba'),
}


def official_families() -> Tuple[str, ...]:
    return tuple(sorted(_FAMILIES))


def build_from_official(
        family: str,
        official_class: str,
        official_kwargs: Mapping[str, Any],
        state_dict: Optional[Mapping[str, torch.Tensor]] = None,
) -> nn.Module:
    """The visionmix model computing what ``official_class(**official_kwargs)`` computes.

    Args:
        family: model family (``official_families()`` lists them).
        official_class: ``path/in/original/repo.py:ClassName`` of the original class.
        official_kwargs: keyword arguments passed to the original constructor.
        state_dict: optional original-layout weights; converted and loaded strictly.
    Returns:
        the model, in eval mode.
    """
    if family not in _FAMILIES:
        raise ValueError(f"family must be one of {official_families()}, got {family!r}")
    model_cls, model_kwargs, filter_fn = _FAMILIES[family](official_class, dict(official_kwargs))
    model = model_cls(**model_kwargs)
    if state_dict is not None:
        model.load_state_dict(filter_fn(dict(state_dict), model), strict=True)
    return model.eval()
