"""InLine attention (Han et al., NeurIPS 2024, https://arxiv.org/abs/2412.06590) on its four host architectures.

One file per host: :mod:`.inline_deit`, :mod:`.inline_pvt`, :mod:`.inline_swin`, :mod:`.inline_cswin`.
``convert_official`` maps a class of https://github.com/LeapLabTHU/InLine and its constructor kwargs to the
visionmix model (used by :func:`visionmix.convert.build_from_official`).
"""
import warnings
from typing import Any, Callable, Dict, Tuple

from .inline_cswin import InLineCSwin
from .inline_cswin import checkpoint_filter_fn as _cswin_filter
from .inline_deit import InLineDeiT
from .inline_deit import checkpoint_filter_fn as _deit_filter
from .inline_pvt import InLinePVT
from .inline_pvt import checkpoint_filter_fn as _pvt_filter
from .inline_swin import InLineSwin
from .inline_swin import checkpoint_filter_fn as _swin_filter

__all__ = ['InLineDeiT', 'InLinePVT', 'InLineSwin', 'InLineCSwin', 'convert_official']

_HOSTS = {
    'models/inline_deit.py': 'VisionTransformer',
    'models/inline_pvt.py': 'PyramidVisionTransformer',
    'models/inline_swin.py': 'InLineSwin',
    'models/inline_cswin.py': 'CSWinTransformer',
}


def _take(kwargs: Dict[str, Any], mapping: Dict[str, str], host: str) -> Dict[str, Any]:
    unknown = sorted(set(kwargs) - set(mapping))
    if unknown:
        raise ValueError(f"official_kwargs for InLine-{host} has arguments visionmix does not know: {unknown}; "
                         f"known: {sorted(mapping)}")
    return {mapping[k]: v for k, v in kwargs.items() if mapping[k]}


def _require(kwargs: Dict[str, Any], name: str, allowed: Tuple, host: str):
    if name in kwargs and kwargs[name] not in allowed:
        raise ValueError(f"{name}={kwargs[name]!r} is not supported for InLine-{host} (supported: {allowed})")


def _warn_attn_drop(kwargs: Dict[str, Any]):
    if kwargs.get('attn_drop_rate', 0.0):
        warnings.warn('attn_drop_rate is ignored: the original InLine attention defines attention dropout but '
                      'never applies it')


_DEIT_KWARGS = {
    'img_size': 'img_size', 'patch_size': 'patch_size', 'in_chans': 'in_chans', 'num_classes': 'num_classes',
    'embed_dim': 'embed_dim', 'depth': 'depth', 'num_heads': 'num_heads', 'mlp_ratio': 'mlp_ratio',
    'qkv_bias': 'qkv_bias', 'drop_rate': 'proj_drop_rate', 'drop_path_rate': 'drop_path_rate',
    'representation_size': '', 'distilled': '', 'attn_drop_rate': '', 'norm_layer': '', 'act_layer': '',
    'weight_init': '',
}


def _deit(kwargs: Dict[str, Any]):
    _require(kwargs, 'representation_size', (None, 0), 'DeiT')
    _require(kwargs, 'distilled', (False,), 'DeiT')
    _require(kwargs, 'norm_layer', (None,), 'DeiT')
    _require(kwargs, 'act_layer', (None,), 'DeiT')
    _warn_attn_drop(kwargs)
    args = _take(kwargs, _DEIT_KWARGS, 'DeiT')
    if 'proj_drop_rate' in args:  # the original applies drop_rate after pos_embed and in every block
        args['drop_rate'] = args['proj_drop_rate']
    return InLineDeiT, args, _deit_filter


_PVT_KWARGS = {
    'img_size': 'img_size', 'patch_size': 'patch_size', 'in_chans': 'in_chans', 'num_classes': 'num_classes',
    'embed_dims': 'embed_dims', 'num_heads': 'num_heads', 'mlp_ratios': 'mlp_ratios', 'qkv_bias': 'qkv_bias',
    'qk_scale': 'qk_scale', 'drop_rate': 'proj_drop_rate', 'drop_path_rate': 'drop_path_rate', 'depths': 'depths',
    'sr_ratios': 'sr_ratios', 'attn_type': 'attn_type', 'attn_drop_rate': '', 'norm_layer': '',
    'la_sr_ratios': '', 'num_stages': '',
}


def _pvt(kwargs: Dict[str, Any]):
    norm = kwargs.get('norm_layer', 'partial(torch.nn.LayerNorm, eps=1e-6)')
    if not (isinstance(norm, str) and norm.replace(' ', '') == 'partial(torch.nn.LayerNorm,eps=1e-6)'):
        raise ValueError(f"norm_layer must be 'partial(torch.nn.LayerNorm, eps=1e-6)' (the released setting), "
                         f"got {norm!r}")
    depths = list(kwargs.get('depths', [3, 4, 6, 3]))
    if kwargs.get('num_stages', 4) != 4 or len(depths) != 4:
        raise ValueError(f"InLine-PVT has 4 stages: got num_stages={kwargs.get('num_stages')!r}, depths={depths}")
    attn_type = kwargs.get('attn_type') or 'IIII'
    la_sr = str(kwargs.get('la_sr_ratios', '8421'))
    for i, kind in enumerate(attn_type):
        if kind == 'I' and int(la_sr[i]) != 1:
            raise ValueError(f"la_sr_ratios={la_sr!r}: InLine with spatial reduction (stage {i} ratio {la_sr[i]}) "
                             f"does not run in the original code; released models use '1111'")
    _warn_attn_drop(kwargs)
    args = _take(kwargs, _PVT_KWARGS, 'PVT')
    args['attn_type'] = attn_type
    args.setdefault('patch_size', 16)
    args.setdefault('embed_dims', [64, 128, 256, 512])
    args.setdefault('num_heads', [1, 2, 4, 8])
    args.setdefault('mlp_ratios', [4, 4, 4, 4])
    args.setdefault('qkv_bias', False)
    args['depths'] = depths
    if 'proj_drop_rate' in args:
        args['drop_rate'] = args['proj_drop_rate']
    return InLinePVT, args, _pvt_filter


_SWIN_KWARGS = {
    'img_size': 'img_size', 'patch_size': 'patch_size', 'in_chans': 'in_chans', 'num_classes': 'num_classes',
    'embed_dim': 'embed_dim', 'depths': 'depths', 'num_heads': 'num_heads', 'window_size': 'window_size',
    'mlp_ratio': 'mlp_ratio', 'qkv_bias': 'qkv_bias', 'drop_rate': 'drop_rate', 'drop_path_rate': 'drop_path_rate',
    'attn_type': 'attn_type', 'qk_scale': '', 'attn_drop_rate': '', 'ape': '', 'patch_norm': '',
    'use_checkpoint': '', 'norm_layer': '', 'kernel_func': '',
}


def _swin(kwargs: Dict[str, Any]):
    _require(kwargs, 'ape', (False,), 'Swin')
    _require(kwargs, 'patch_norm', (True,), 'Swin')
    _require(kwargs, 'qk_scale', (None,), 'Swin')
    _require(kwargs, 'kernel_func', ('identity',), 'Swin')
    if kwargs.get('norm_layer') not in (None,) and 'norm_layer' in kwargs:
        name = getattr(kwargs['norm_layer'], '__name__', kwargs['norm_layer'])
        if name not in ('LayerNorm', 'nn.LayerNorm', 'torch.nn.LayerNorm'):
            raise ValueError(f"norm_layer must be nn.LayerNorm for InLine-Swin, got {kwargs['norm_layer']!r}")
    _warn_attn_drop(kwargs)
    args = _take(kwargs, _SWIN_KWARGS, 'Swin')
    args.setdefault('window_size', 7)
    args.setdefault('attn_type', 'IIII')
    args.setdefault('drop_path_rate', 0.1)
    if 'drop_rate' in args:  # the original applies drop_rate after the patch embedding and in every block
        args['proj_drop_rate'] = args['drop_rate']
    for name in ('depths', 'num_heads'):
        if name in args:
            args[name] = tuple(args[name])
    return InLineSwin, args, _swin_filter


_CSWIN_KWARGS = {
    'img_size': 'img_size', 'patch_size': '', 'in_chans': 'in_chans', 'num_classes': 'num_classes',
    'embed_dim': 'embed_dim', 'depth': 'depths', 'split_size': 'split_size', 'la_split_size': 'la_split_size',
    'num_heads': 'num_heads', 'mlp_ratio': 'mlp_ratio', 'qkv_bias': 'qkv_bias', 'qk_scale': 'qk_scale',
    'drop_rate': 'proj_drop_rate', 'drop_path_rate': 'drop_path_rate', 'attn_type': 'attn_type',
    'attn_drop_rate': '', 'hybrid_backbone': '', 'use_chk': '', 'norm_layer': '',
}


def _cswin(kwargs: Dict[str, Any]):
    _require(kwargs, 'hybrid_backbone', (None,), 'CSwin')
    if 'norm_layer' in kwargs and getattr(kwargs['norm_layer'], '__name__', kwargs['norm_layer']) not in (
            'LayerNorm', 'nn.LayerNorm', 'torch.nn.LayerNorm'):
        raise ValueError(f"norm_layer must be nn.LayerNorm for InLine-CSwin, got {kwargs['norm_layer']!r}")
    _warn_attn_drop(kwargs)
    args = _take(kwargs, _CSWIN_KWARGS, 'CSwin')
    args.setdefault('embed_dim', 96)
    args.setdefault('depths', [2, 2, 6, 2])
    args.setdefault('la_split_size', '1-2-7-7')
    args.setdefault('attn_type', 'IIII')
    for name in ('depths', 'num_heads', 'split_size'):
        if name in args:
            args[name] = tuple(args[name])
    if isinstance(args['la_split_size'], str):
        args['la_split_size'] = tuple(int(s) for s in args['la_split_size'].split('-'))
    return InLineCSwin, args, _cswin_filter


_CONVERTERS: Dict[str, Callable] = {
    'models/inline_deit.py': _deit,
    'models/inline_pvt.py': _pvt,
    'models/inline_swin.py': _swin,
    'models/inline_cswin.py': _cswin,
}


def convert_official(official_class: str, official_kwargs: Dict[str, Any]):
    """``(model_class, model_kwargs, checkpoint_filter_fn)`` equivalent to an InLine class and its kwargs.

    ``official_class`` names the host file and class, e.g. ``'models/inline_swin.py:InLineSwin'``.
    """
    path, _, cls_name = official_class.partition(':')
    path = path.strip()
    cls_name = cls_name.strip().split(' ')[0]
    if path not in _HOSTS or (cls_name and cls_name != _HOSTS[path]):
        raise ValueError(f"official_class for inline must be one of "
                         f"{[f'{p}:{c}' for p, c in _HOSTS.items()]}, got {official_class!r}")
    return _CONVERTERS[path](dict(official_kwargs))
