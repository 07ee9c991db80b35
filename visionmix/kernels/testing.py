"""Comparison helpers for operator tests, in the style of flash-linear-attention's ``assert_close``.

Errors are measured as relative RMS (``rms(a - b) / rms(b)``) with an absolute floor, so a tolerance
means the same thing for fp32 (~1e-5) and bf16 (~5e-3) whatever the magnitude of the tensor.
"""
from typing import Callable, Dict, Optional, Sequence

import torch


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    num = (actual - expected).pow(2).mean().sqrt()
    den = expected.pow(2).mean().sqrt()
    return (num / den.clamp_min(torch.finfo(torch.float64).tiny)).item()


def assert_close(
        name: str,
        actual: torch.Tensor,
        expected: torch.Tensor,
        ratio: float,
        atol: float = 1e-6,
) -> None:
    """Pass when ``rms(actual - expected) <= ratio * rms(expected)`` or ``max|actual - expected| <= atol``.

    NaN or inf anywhere in ``actual`` that ``expected`` does not have fails, whatever the ratio.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.equal(torch.isfinite(a), torch.isfinite(e)):
        raise AssertionError(f"{name}: non-finite values differ (actual has {(~torch.isfinite(a)).sum()} non-finite)")
    finite = torch.isfinite(e)
    a, e = a[finite], e[finite]
    if e.numel() == 0:
        return
    abs_err = (a - e).abs().max().item()
    rel = rel_rms_error(a, e)
    if abs_err <= atol or rel <= ratio:
        return
    raise AssertionError(
        f"{name}: relative RMS error {rel:.3e} > {ratio:.1e} and max abs error {abs_err:.3e} > {atol:.1e}")


def compare_forward_backward(
        fn: Callable[..., torch.Tensor],
        ref_fn: Callable[..., torch.Tensor],
        inputs: Dict[str, torch.Tensor],
        ratio: float,
        atol: float = 1e-6,
        grad_names: Optional[Sequence[str]] = None,
        seed: int = 0,
) -> Dict[str, float]:
    """Run ``fn(**inputs)`` and ``ref_fn(**inputs)``, compare outputs and the gradients of every input.

    Inputs are cloned for each side; ``grad_names`` (default: every floating-point input) get
    ``requires_grad``. Returns the relative RMS error of each compared quantity.
    """
    if grad_names is None:
        grad_names = [k for k, v in inputs.items() if torch.is_tensor(v) and v.is_floating_point()]

    def run(f):
        xs = {k: (v.detach().clone().requires_grad_(k in grad_names) if torch.is_tensor(v) else v)
              for k, v in inputs.items()}
        out = f(**xs)
        return xs, out

    xs, out = run(fn)
    xs_ref, out_ref = run(ref_fn)
    gen = torch.Generator(device='cpu').manual_seed(seed)
    dout = torch.randn(out_ref.shape, generator=gen, dtype=torch.float64).to(out_ref)
    out.backward(dout.to(out.dtype))
    out_ref.backward(dout)
    errors = {'out': rel_rms_error(out, out_ref)}
    assert_close('out', out, out_ref, ratio, atol)
    for k in grad_names:
        g, g_ref = xs[k].grad, xs_ref[k].grad
        if g_ref is None:
            if g is not None and g.abs().max() > 0:
                raise AssertionError(f"d{k}: reference has no gradient but the implementation does")
            continue
        if g is None:
            raise AssertionError(f"d{k}: missing gradient")
        errors[f'd{k}'] = rel_rms_error(g, g_ref)
        assert_close(f'd{k}', g, g_ref, ratio, atol)
    return errors
