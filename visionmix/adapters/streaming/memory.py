"""Linear-attention memory for tokens that left the attention window.

Evicted keys and values are absorbed once into per-head running means ``z = mean phi(k)``,
``M = mean phi(k) v^T`` with a token count ``N``, kept in float32 whatever the activation dtype; a query
reads ``phi(q)^T M / (phi(q)^T z + eps)``, normalised linear attention over everything evicted so far.
The means (not sums) keep the state bounded over an unbounded stream; the ratio is the same.

``memory_readout_chunked`` is the same readout for a whole clip at once (every chunk reads the memory holding
the chunks evicted before it), differentiable, for training.
"""
from typing import Callable, Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['FEATURE_MAPS', 'LinearMemory', 'memory_readout_chunked']


def _elu_plus_one(x: Tensor) -> Tensor:
    return F.elu(x) + 1


FEATURE_MAPS: Dict[str, Callable[[Tensor], Tensor]] = {'relu': F.relu, 'elu1': _elu_plus_one}


def feature_map(name: str) -> Callable[[Tensor], Tensor]:
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {name!r}")
    return FEATURE_MAPS[name]


class LinearMemory:
    """Per-(batch, head) running means ``z [B, H, Dk]``, ``M [B, H, Dk, Dv]`` and the count ``N``, preallocated.

    ``absorb`` and ``read`` take the already feature-mapped keys/queries: the streaming attention decides which
    map and rotation go where (see ``HybridStreamingAttention``).
    """

    def __init__(self, batch: int, heads: int, key_dim: int, value_dim: int, device=None, eps: float = 1e-6,
                 state_dtype: torch.dtype = torch.float32):
        self.eps = eps
        self.z = torch.zeros(batch, heads, key_dim, device=device, dtype=state_dtype)
        self.M = torch.zeros(batch, heads, key_dim, value_dim, device=device, dtype=state_dtype)
        self.count = torch.zeros((), device=device, dtype=torch.float64)  # exact token count for any stream length

    def reset(self) -> None:
        self.z.zero_()
        self.M.zero_()
        self.count.zero_()

    def absorb(self, k_for_z: Tensor, k_for_M: Tensor, v: Tensor) -> None:
        """Fold ``s`` tokens ``[B, s, H, D]`` into the means, in place: ``x <- (N x + sum) / (N + s)``."""
        s = k_for_z.shape[1]
        total = self.count + s
        keep, add = (self.count / total).to(self.z.dtype), (1.0 / total).to(self.z.dtype)
        acc = self.z.dtype
        self.z.mul_(keep).add_(k_for_z.to(acc).sum(1) * add)
        self.M.mul_(keep).add_(torch.einsum('bshk,bshv->bhkv', k_for_M.to(acc), v.to(acc)) * add)
        self.count.copy_(total)

    def read(self, q_for_M: Tensor, q_for_z: Tensor) -> Tensor:
        """``q^T M / (phi(q)^T z + eps)`` for queries ``[B, S, H, Dk]``; zero while nothing was absorbed."""
        acc = self.z.dtype
        num = torch.einsum('bshk,bhkv->bshv', q_for_M.to(acc), self.M)
        den = torch.einsum('bshk,bhk->bsh', q_for_z.to(acc), self.z)
        return (num / (den[..., None] + self.eps)).to(q_for_M.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.z, self.M, self.count))


def memory_readout_chunked(q: Tensor, k: Tensor, v: Tensor, absorbed: Sequence[Sequence[int]], chunk_tokens: int,
                           eps: float = 1e-6) -> Tensor:
    """Readout of every chunk of a clip, with ``absorbed[c]`` the chunk ids in memory when chunk ``c`` runs.

    ``q``, ``k`` ``[B, T, H, Dk]`` already feature-mapped, ``v`` ``[B, T, H, Dv]``, ``T = chunks * chunk_tokens``.
    Equal to absorbing chunk by chunk into ``LinearMemory`` and reading (running means; float32 accumulation).
    """
    B, T, H, Dk = k.shape
    n = T // chunk_tokens
    acc = torch.promote_types(q.dtype, torch.float32)
    kc = k.to(acc).reshape(B, n, chunk_tokens, H, Dk)
    vc = v.to(acc).reshape(B, n, chunk_tokens, H, -1)
    z_chunk = kc.sum(2)  # [B, n, H, Dk]
    M_chunk = torch.einsum('bnshk,bnshv->bnhkv', kc, vc)
    select = torch.zeros(n, n, dtype=acc, device=q.device)  # select[c, j] = 1 / |absorbed[c]| if j absorbed
    for c, ids in enumerate(absorbed):
        if len(ids):
            select[c, list(ids)] = 1.0 / (len(ids) * chunk_tokens)
    z = torch.einsum('cj,bjhk->bchk', select, z_chunk)
    M = torch.einsum('cj,bjhkv->bchkv', select, M_chunk)
    qc = q.to(acc).reshape(B, n, chunk_tokens, H, Dk)
    num = torch.einsum('bcshk,bchkv->bcshv', qc, M)
    den = torch.einsum('bcshk,bchk->bcsh', qc, z)
    return (num / (den[..., None] + eps)).reshape(B, T, H, -1).to(q.dtype)
