"""Backend choice for visionmix operators.

``auto`` runs the Triton kernels on CUDA tensors and the PyTorch reference on anything else.
``VISIONMIX_BACKEND=torch|triton`` forces one for every call that asks for ``auto``. Triton kernels
also run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
imported), which is how the kernels themselves are tested on machines without a GPU.
"""
import importlib.util
import os

import torch

BACKENDS = ('auto', 'triton', 'torch')
ENV_VAR = 'VISIONMIX_BACKEND'


def interpreter_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


_TRITON_INSTALLED = importlib.util.find_spec('triton') is not None  # once: read on every call under torch.compile


def triton_available() -> bool:
    return _TRITON_INSTALLED


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return ``'triton'`` or ``'torch'`` for a call on ``tensors``.

    Raises a ValueError when the requested backend cannot run on these tensors.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == 'auto':
        backend = os.environ.get(ENV_VAR, 'auto').strip().lower() or 'auto'
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == 'auto':
        return 'triton' if on_cuda and triton_available() else 'torch'
    if backend == 'triton':
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if not on_cuda and not interpreter_mode():
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
                "to run the kernels on CPU tensors in Triton's interpreter")
    return backend


def triton_dtype_ok(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16, torch.float32)
