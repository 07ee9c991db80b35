"""Load the original authors' training checkpoints without executing pickled code.

Released files of several families are whole training dicts that also pickle the run's configuration
(an ``argparse.Namespace``, a yacs ``CfgNode``), which ``torch.load(weights_only=True)`` refuses and
``weights_only=False`` would execute. ``load_checkpoint`` unpickles with an allowlist instead: tensors,
plain containers, and those configuration objects rebuilt as plain dicts / namespaces.
"""
import argparse
import collections
import pickle
import types
from typing import Any, Callable, Dict

import torch

__all__ = ['load_checkpoint', 'load_release_weights', 'UnsafeCheckpointError']


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint pickles an object outside the allowlist."""


class _ConfigNode(dict):
    """Stand-in for yacs' ``CfgNode``: its items, nothing else."""

    def __setstate__(self, state):
        self.update({k: v for k, v in state.items() if not k.startswith('__')})


_SAFE = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('argparse', 'Namespace'): argparse.Namespace,
    ('yacs.config', 'CfgNode'): _ConfigNode,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'slice'): slice,
    ('builtins', 'object'): object,
    ('builtins', 'dict'): dict,
    ('builtins', 'tuple'): tuple,
    ('builtins', 'list'): list,
}


def _reconstructor(cls, base, state):
    if cls not in (_ConfigNode, collections.OrderedDict, argparse.Namespace) or base not in (dict, object):
        raise UnsafeCheckpointError(f"refusing to rebuild {cls!r} from {base!r}")
    obj = cls()
    if state is not None:
        obj.update(state)
    return obj


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith('torch') and (name.startswith('_rebuild') or name.endswith('Storage')
                                           or name in ('device', 'Size', 'dtype')
                                           or module == 'torch' and isinstance(getattr(torch, name, None),
                                                                               torch.dtype)):
            return super().find_class(module, name)
        if (module, name) == ('copyreg', '_reconstructor'):
            return _reconstructor
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        raise UnsafeCheckpointError(
            f"checkpoint pickles {module}.{name}, which is not on visionmix's allowlist of checkpoint contents")


_pickle_module = types.ModuleType('visionmix_safe_pickle')
_pickle_module.Unpickler = _Unpickler
_pickle_module.load = lambda f, **kw: _Unpickler(f, **kw).load()
_pickle_module.__name__ = 'visionmix_safe_pickle'


def load_checkpoint(path, map_location='cpu') -> Dict[str, Any]:
    """Load a ``.pth`` checkpoint; tries ``weights_only=True`` first, then the allowlisting unpickler.

    Configuration objects come back as a dict (yacs) or ``argparse.Namespace``; anything else outside
    tensors and plain containers raises ``UnsafeCheckpointError``.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass
    if hasattr(path, 'seek'):
        path.seek(0)
    return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_pickle_module)


def load_release_weights(model: torch.nn.Module, path, checkpoint_filter_fn: Callable) -> None:
    """Load an original release file (or a state_dict in either layout) into ``model``.

    This is what the families' ``load_pretrained`` run when timm's pretrained cfg sets ``custom_load``:
    the file is read with ``load_checkpoint``, converted by the family's ``checkpoint_filter_fn`` and loaded
    strictly, except that a classifier whose shape differs from the model's (another ``num_classes``) is
    left initialised and one the model does not have (``num_classes=0``) is dropped, as timm does for its own
    weights.
    """
    state_dict = checkpoint_filter_fn(load_checkpoint(path), model)
    classifiers = getattr(model, 'pretrained_cfg', {}).get('classifier') or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    own = model.state_dict()
    mismatched = [k for c in classifiers for k in (f'{c}.weight', f'{c}.bias')
                  if k in state_dict and (k not in own or own[k].shape != state_dict[k].shape)]
    for k in mismatched:
        if k in own:
            state_dict[k] = own[k]
        else:  # no classifier at all (num_classes=0)
            del state_dict[k]
    model.load_state_dict(state_dict, strict=True)
