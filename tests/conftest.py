import os
import pathlib
import sys
import types

import pytest
import torch

# Triton kernels run in the interpreter when there is no GPU; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

REPO = pathlib.Path(__file__).resolve().parents[1]


def parity_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get('VISIONMIX_PARITY_DIR', REPO.parent / 'shared' / 'parity'))


def parity_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The parity fixtures' measure: ``max |actual - expected| / max |expected|``."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def parity_files(folder: str, pattern: str = '*.pt'):
    """Parity fixture paths (as pytest params with readable ids), or one skipped param if absent."""
    root = parity_dir() / folder
    files = sorted(root.glob(pattern))
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f'no parity fixtures at {root} '
                                                               f'(set VISIONMIX_PARITY_DIR)'))]
    return [pytest.param(f, id=f.stem) for f in files]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    # timm's own model suite is taken from the sdist of the installed timm version; fetch it once, in the
    # controlling process (xdist workers start after this and find the file in place)
    if os.environ.get('PYTEST_XDIST_WORKER'):
        return
    from tests.timm_suite.fetch import fetch_timm_model_tests
    fetch_timm_model_tests()


@pytest.fixture
def fake_yacs(monkeypatch):
    """A module named like yacs' config, so a CfgNode-bearing checkpoint can be written without yacs."""
    module, package = types.ModuleType('yacs.config'), types.ModuleType('yacs')

    class CfgNode(dict):
        def __init__(self, init_dict=None):
            super().__init__(init_dict or {})
            self.__dict__['__immutable__'] = False

    CfgNode.__module__, CfgNode.__qualname__ = 'yacs.config', 'CfgNode'
    module.CfgNode, package.config = CfgNode, module
    monkeypatch.setitem(sys.modules, 'yacs', package)
    monkeypatch.setitem(sys.modules, 'yacs.config', module)
    return CfgNode
