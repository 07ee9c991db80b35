"""Stand-in for ``mmcv._ext`` under mmcv-lite.

mmsegmentation 1.2.2 imports ``mmcv.ops`` (through ``mmseg.models``) even for models that never call a compiled
op, and mmcv-lite ships no ``mmcv._ext``. The stand-in lets the import succeed; UperNet and Semantic FPN never touch
it, and any op that does reach it raises a ``NotImplementedError`` naming the op and the way out (full mmcv).
"""
import importlib
import importlib.machinery
import sys
import types

__all__ = ['install_mmcv_ext_stub', 'MMCV_EXT_STUB_NAME']

MMCV_EXT_STUB_NAME = 'mmcv._ext'
_HINT = ('this environment has mmcv-lite, which has no compiled ops. The UperNet and Semantic FPN configs of '
         'visionmix do not need any; a head that does needs the full mmcv 2.1.0 built from source (see README, '
         '"Semantic segmentation")')


def _missing_op(name: str):
    if name.startswith('__'):
        raise AttributeError(name)

    def op(*args, **kwargs):
        raise NotImplementedError(f'{MMCV_EXT_STUB_NAME}.{name} was called, but {_HINT}.')

    op.__name__ = name
    return op


def install_mmcv_ext_stub() -> bool:
    """Register the stand-in unless a real ``mmcv._ext`` imports. Returns True when the stand-in is in place."""
    current = sys.modules.get(MMCV_EXT_STUB_NAME)
    if current is not None:
        return getattr(current, '__visionmix_stub__', False)
    try:
        importlib.import_module(MMCV_EXT_STUB_NAME)
        return False
    except ImportError:
        pass
    stub = types.ModuleType(MMCV_EXT_STUB_NAME, 'mmcv-lite stand-in installed by visionmix.segmentation')
    # A spec without a loader: mmengine's `mmcv_full_available()` (pkgutil.find_loader) then reports no compiled mmcv.
    stub.__spec__ = importlib.machinery.ModuleSpec(MMCV_EXT_STUB_NAME, loader=None)
    stub.__getattr__ = _missing_op
    stub.__visionmix_stub__ = True
    sys.modules[MMCV_EXT_STUB_NAME] = stub
    return True
