"""Block-sparse attention cases (``--op block_sparse``, alias ``bsa``) for
``visionmix.kernels.block_sparse.block_sparse_attention`` and its baselines: dense SDPA over all tokens, SDPA with
the dense boolean mask and FlexAttention with the same block index.

Cases are the patterns the op serves, on tokens already in block order (the GRAT group-major reorder and BiFormer's
region-major layout are not timed for any implementation): GRAT-B / GRAT-X for Flux images and HunyuanVideo-like
latents (text block first or after, padding text keys hidden), BiFormer-T's routed regions with a random top-k
index shared across heads, and a MoBA-like block-causal index chosen per head. Density is the fraction of key
blocks a query block lists, averaged over query blocks (and batch and heads where the index has them).
"""
import argparse
import dataclasses
import fnmatch
import math
import sys
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from visionmix.kernels._backend import resolve_backend
from visionmix.kernels.block_sparse import block_sparse_attention, block_sparse_mask, check_args, uniform_offsets

from .common import (
    DTYPES,
    OpImpl,
    Table,
    add_ratios,
    benchmark_case,
    build_impls,
    default_batch,
    format_si,
    free_memory,
    join_dims,
    parse_dims,
    random_inputs,
    relative_error,
    result_header,
)

IMPLS = ('visionmix', 'visionmix-ref', 'sdpa-dense', 'sdpa-masked', 'flex')
DENSE_CHECK_ROWS = 256
# Largest B * heads * Nq * Nk for sdpa-masked: the dense boolean mask, and SDPA's float copy of it or, on the math
# backend, the attention weights.
MASKED_MAX_ELEMENTS = {'cuda': 2 ** 32, 'cpu': 2 ** 26}
# Largest float32 working set (elements) of the PyTorch reference, which gathers every listed key block per query
# block: B * heads * query blocks * listed keys * (head_dim + value dim + 3 * query block length).
REFERENCE_MAX_ELEMENTS = {'cuda': 2 ** 32, 'cpu': 2 ** 28}
# FlexAttention's GPU kernel takes sparse blocks that are powers of two from 16 tokens (it shrinks its tiles to
# them); other patterns go through a mask_mod on its default 128-token tiles.
FLEX_MIN_BLOCK = 16
CUSTOM_BLOCK_SIZE = 128
CUSTOM_DENSITY = 0.25
HYV_VALID_TEXT = 100  # illustrative prompt length: HunyuanVideo's GRAT hides the padding text keys past it
TABLE = Table([('case', lambda r: r['case']), ('shape', lambda r: r['shape']), ('pattern', lambda r: r['pattern']),
               ('blocks', lambda r: r['blocks']), ('density', lambda r: format_density(r['density'])),
               ('keys/q', lambda r: format_si(r['keys_per_query'])), ('mode', lambda r: r['mode']),
               ('impl', lambda r: r['impl'])])


def format_density(value: float) -> str:
    return f'{100 * value:.3g}%'


@dataclasses.dataclass
class BlockSparseCase:
    """One block-sparse self-attention problem: heads-last tensors ``[batch, tokens, heads, head_dim]`` cut into
    blocks by ``offsets`` (block ``i`` = tokens ``offsets[i]:offsets[i + 1]``, used for queries and keys), the index
    in FlexAttention's layout on the CPU (``kv_indices [B|1, H|1, blocks, slots]``, ``kv_num_blocks [B|1, H|1,
    blocks]`` or None for all slots), an optional ``key_mask [B|1, tokens]`` and block-causal masking."""
    name: str
    batch: int
    heads: int
    head_dim: int
    offsets: Tuple[int, ...]
    kv_indices: torch.Tensor
    kv_num_blocks: Optional[torch.Tensor] = None
    key_mask: Optional[torch.Tensor] = None
    is_causal: bool = False
    scale: Optional[float] = None
    block_size: Optional[int] = None  # set when every block but the last has this many tokens
    pattern: str = ''
    blocks: str = ''
    _stats: Optional[dict] = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.kv_num_blocks is None:
            self.kv_num_blocks = torch.full(self.kv_indices.shape[:3], self.kv_indices.shape[-1], dtype=torch.int32)
        if not self.blocks:
            self.blocks = str(self.block_size)

    @property
    def seq_len(self) -> int:
        return self.offsets[-1]

    @property
    def num_blocks(self) -> int:
        return len(self.offsets) - 1

    @property
    def shape(self) -> Tuple[int, ...]:
        return (self.batch, self.seq_len, self.heads, self.head_dim)

    def label(self) -> str:
        return join_dims(self.shape)

    def to_heads_first(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, H, D]`` -> contiguous ``[B, H, N, D]``."""
        return x.transpose(1, 2).contiguous()

    def to_heads_last(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, D]`` -> ``[B, N, H, D]`` (a view)."""
        return x.transpose(1, 2)

    def valid_slots(self) -> torch.Tensor:
        return torch.arange(self.kv_indices.shape[-1]) < self.kv_num_blocks[..., None]

    def block_allowed(self) -> torch.Tensor:
        """``[B|1, H|1, blocks, blocks]`` bool: query block x key block listed by the index."""
        allowed = torch.zeros(*self.kv_indices.shape[:3], self.num_blocks + 1, dtype=torch.bool)
        allowed.scatter_(-1, torch.where(self.valid_slots(), self.kv_indices.long(), self.num_blocks), True)
        return allowed[..., :-1]

    def density(self) -> float:
        """Fraction of key blocks listed per query block, averaged over query blocks, batch and heads."""
        return self.kv_num_blocks.double().mean().item() / self.num_blocks

    def keys_per_query(self) -> float:
        """Mean number of keys a query sees: its listed blocks, less keys hidden by ``key_mask`` (averaged over the
        batch) or by causality."""
        offsets = torch.tensor(self.offsets)
        valid_key = (self.key_mask.double().mean(0) if self.key_mask is not None
                     else torch.ones(self.seq_len, dtype=torch.float64))
        cum = torch.cat([valid_key.new_zeros(1), valid_key.cumsum(0)])
        ids = torch.where(self.valid_slots(), self.kv_indices.long(), 0)
        starts, ends = offsets[ids], offsets[ids + 1]  # [B|1, H|1, blocks, slots] token ranges of listed blocks
        used = self.valid_slots()
        if not self.is_causal:
            per_block = torch.where(used, cum[ends] - cum[starts], 0).sum(-1)  # keys seen by each query of a block
            total = (per_block * offsets.diff()).sum(-1)
        else:
            block_of = torch.repeat_interleave(torch.arange(self.num_blocks), offsets.diff())
            last = torch.arange(self.seq_len)[:, None] + 1  # keys [0, query] (queries and keys share one length)
            ends_tok = torch.minimum(ends[:, :, block_of], last).clamp_min(starts[:, :, block_of])
            total = torch.where(used[:, :, block_of], cum[ends_tok] - cum[starts[:, :, block_of]], 0).sum((-1, -2))
        return total.mean().item() / self.seq_len

    def row_fields(self) -> dict:
        if self._stats is None:  # once per case, not per row
            self._stats = dict(density=self.density(), keys_per_query=self.keys_per_query())
        return dict(case=self.name, shape=self.label(), batch=self.batch, seq_len=self.seq_len, heads=self.heads,
                    head_dim=self.head_dim, pattern=self.pattern, blocks=self.blocks, num_blocks=self.num_blocks,
                    **self._stats, is_causal=self.is_causal, tokens=self.batch * self.seq_len)


# ----------------------------------------------------------------------------------------------------------------
# Cases


def grat_case(name: str, grid: Sequence[int], group_size, mode: str, heads: int, head_dim: int, batch: int,
              radius: int = 1, text_tokens: int = 0, text_first: bool = False,
              attenable_text: Optional[int] = None) -> BlockSparseCase:
    """A GRAT pattern from ``visionmix.layers.grat.grat_index`` (tokens in its group-major order)."""
    from visionmix.layers.grat import grat_index  # imported here: the other ops do not depend on the GRAT layer

    idx = grat_index(grid, group_size, mode, radius, text_tokens, text_first, attenable_text)
    group_len = math.prod(group_size) if isinstance(group_size, (tuple, list)) else group_size ** len(grid)
    pattern = f'GRAT-{mode}' + (f' r{radius}' if mode == 'B' else '')
    blocks = str(group_len)
    if text_tokens:
        valid = '' if attenable_text is None or attenable_text == text_tokens else f' ({attenable_text} valid)'
        blocks += f" + text {text_tokens}{valid} {'first' if text_first else 'after'}"
    return BlockSparseCase(name, batch, heads, head_dim, tuple(idx.offsets), idx.kv_indices.cpu(),
                           idx.kv_num_blocks.cpu(), None if idx.key_mask is None else idx.key_mask.cpu(),
                           pattern=pattern, blocks=blocks)


def biformer_case(name: str, size: int, n_win: int, topk: int, heads: int, batch: int,
                  head_dim: int = 32, seed: int = 0) -> BlockSparseCase:
    """BiFormer's routed attention on a ``size x size`` map in ``n_win x n_win`` regions (region-major tokens):
    a random top-k of the regions per image, shared across heads; scale ``qk_dim ** -0.5`` as in the model."""
    region = (size // n_win) ** 2
    regions = n_win * n_win
    generator = torch.Generator(device='cpu').manual_seed(seed)
    scores = torch.rand(batch, 1, regions, regions, generator=generator)
    kv_indices = scores.topk(topk, dim=-1).indices.to(torch.int32)  # best first, as the router returns them
    return BlockSparseCase(name, batch, heads, head_dim, uniform_offsets(regions * region, region), kv_indices,
                           scale=(heads * head_dim) ** -0.5, block_size=region, pattern=f'BiFormer top-{topk}')


def random_index(heads: int, num_blocks: int, topk: int, causal: bool, seed: int) -> Tuple[torch.Tensor, ...]:
    """``(kv_indices [1, heads, M, topk], kv_num_blocks [1, heads, M])`` of random key blocks per query block; with
    ``causal`` the query's own block plus ``topk - 1`` random earlier blocks (MoBA's gate keeps its own block)."""
    generator = torch.Generator(device='cpu').manual_seed(seed)
    scores = torch.rand(1, heads, num_blocks, num_blocks, generator=generator)
    if not causal:
        kv_indices = scores.topk(topk, dim=-1).indices
        return kv_indices.to(torch.int32), torch.full((1, heads, num_blocks), topk, dtype=torch.int32)
    rows, cols = torch.arange(num_blocks)[:, None], torch.arange(num_blocks)[None, :]
    scores = torch.where(cols == rows, 2.0, torch.where(cols < rows, scores, -1.0))
    kv_indices = scores.topk(topk, dim=-1).indices
    counts = (torch.arange(num_blocks) + 1).clamp(max=topk).expand(1, heads, -1).to(torch.int32)
    kv_indices = torch.where(torch.arange(topk) < counts[..., None], kv_indices, 0)
    return kv_indices.to(torch.int32), counts.contiguous()


def uniform_case(name: str, tokens: int, block_size: int, topk: int, heads: int, head_dim: int, batch: int,
                 causal: bool, pattern: str, shared_heads: bool, seed: int = 0) -> BlockSparseCase:
    num_blocks = -(-tokens // block_size)
    kv_indices, kv_num_blocks = random_index(1 if shared_heads else heads, num_blocks, topk, causal, seed)
    return BlockSparseCase(name, batch, heads, head_dim, uniform_offsets(tokens, block_size), kv_indices,
                           kv_num_blocks, is_causal=causal, block_size=block_size, pattern=pattern)


def moba_case(name: str, tokens: int, block_size: int, topk: int, heads: int, head_dim: int,
              batch: int) -> BlockSparseCase:
    """MoBA-like: uniform blocks, each query block sees its own block (causally) and ``topk - 1`` earlier blocks
    chosen per head."""
    return uniform_case(name, tokens, block_size, topk, heads, head_dim, batch, True,
                        f'MoBA top-{topk} causal', shared_heads=False)


def default_block_sparse_cases(device: torch.device, batch: Optional[int]) -> List[BlockSparseCase]:
    """The GPU set on CUDA, a CPU set of small versions elsewhere.

    GPU: GRAT-B (radius 1) and GRAT-X for Flux at 1024 px (64x64 latent tokens in 16x16 groups, 512 text tokens
    first) and for HunyuanVideo at 768x1280 px with 32, 64 and 128 frames (latent 8/16/32 x 48 x 80 = 30,720 /
    61,440 / 122,880 tokens in 4x8x8 groups, 256 text tokens after, 100 valid), 24 heads x 128; BiFormer-T
    stages 1-3 at 224 px (n_win 7: 64-token regions top-1, 16-token top-4, 4-token top-16; 2/4/8 heads x 32) and
    stage 1 at 1024 px (n_win 16 as the COCO models: 256-token regions, top-1); MoBA-like 32K tokens in 512-token
    blocks, top-3 block-causal, 32 heads x 128. Batch: ``batch``, else 1 for GRAT and MoBA (one sequence) and
    the op default for BiFormer.

    CPU: the same patterns shrunk (2 heads x 32): GRAT on a 16x16 image in 4x4 groups (the 4x4 group grid of
    Flux at 1024 px) with 32 text tokens first, and on an 8x12x20 video in 2x4x4 groups with 32 text tokens after
    (25 valid); BiFormer-T stages 1-3 at 224 px as on GPU and stage 1 at 512 px (n_win 8 as the ADE20K models);
    MoBA-like 2,048 tokens in 128-token blocks.
    """
    one = batch or 1
    bif = batch or (8 if device.type == 'cuda' else 1)
    biformer_224 = [
        biformer_case('biformer-t-224-s1', 56, 7, 1, 2, bif),
        biformer_case('biformer-t-224-s2', 28, 7, 4, 4, bif),
        biformer_case('biformer-t-224-s3', 14, 7, 16, 8, bif),
    ]
    if device.type == 'cuda':
        cases = []
        for mode in ('B', 'X'):
            cases.append(grat_case(f'grat-{mode.lower()}-flux-1024px', (64, 64), 16, mode, 24, 128, one,
                                   text_tokens=512, text_first=True))
        for frames in (8, 16, 32):
            for mode in ('B', 'X'):
                cases.append(grat_case(f'grat-{mode.lower()}-hyv-{frames}x48x80', (frames, 48, 80), (4, 8, 8), mode,
                                       24, 128, one, text_tokens=256, attenable_text=HYV_VALID_TEXT))
        return cases + biformer_224 + [
            biformer_case('biformer-t-1024-s1', 256, 16, 1, 2, bif),
            moba_case('moba-32k-b512-top3', 32768, 512, 3, 32, 128, one),
        ]
    cases = []
    for mode in ('B', 'X'):
        cases.append(grat_case(f'grat-{mode.lower()}-image-16x16', (16, 16), 4, mode, 2, 32, one, text_tokens=32,
                               text_first=True))
    for mode in ('B', 'X'):
        cases.append(grat_case(f'grat-{mode.lower()}-video-8x12x20', (8, 12, 20), (2, 4, 4), mode, 2, 32, one,
                               text_tokens=32, attenable_text=25))
    return cases + biformer_224 + [
        biformer_case('biformer-t-512-s1', 128, 8, 1, 2, bif),
        moba_case('moba-2k-b128-top3', 2048, 128, 3, 2, 32, one),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Implementations


def device_index(case: BlockSparseCase, device: torch.device) -> dict:
    """The case's index and masks on ``device``, as ``block_sparse_attention`` keywords."""
    every_slot = bool((case.kv_num_blocks == case.kv_indices.shape[-1]).all())  # then None, as BiFormer passes
    kwargs = dict(kv_indices=case.kv_indices.to(device),
                  kv_num_blocks=None if every_slot else case.kv_num_blocks.to(device), key_mask=None,
                  is_causal=case.is_causal, scale=case.scale)
    if case.block_size is not None:
        kwargs['block_size'] = case.block_size
    else:
        kwargs.update(q_block_offsets=case.offsets, k_block_offsets=case.offsets)
    if case.key_mask is not None:
        kwargs['key_mask'] = case.key_mask.to(device).expand(case.batch, -1).contiguous()
    return kwargs


def reference_elements(case: BlockSparseCase) -> int:
    lengths = [b - a for a, b in zip(case.offsets[:-1], case.offsets[1:])]
    longest = max(lengths)
    listed = case.kv_indices.shape[-1] * longest
    return case.batch * case.heads * case.num_blocks * listed * (2 * case.head_dim + 3 * longest)


def make_visionmix(case: BlockSparseCase, device: torch.device, backend: str) -> OpImpl:
    name = 'visionmix' if backend == 'auto' else 'visionmix-ref'
    if resolve_backend(backend, torch.empty(0, device=device)) == 'torch':
        elements, budget = reference_elements(case), REFERENCE_MAX_ELEMENTS.get(device.type, 2 ** 28)
        if elements > budget:
            return OpImpl(name, skip=f'the PyTorch reference gathers {elements / 2 ** 20:,.0f}Mi float32 elements, '
                                     f'over the {budget / 2 ** 20:,.0f}Mi budget on {device.type}')
    kwargs = device_index(case, device)

    def fn(q, k, v):
        return block_sparse_attention(q, k, v, validate_index=False, backend=backend, **kwargs)
    return OpImpl(name, fn)


def dense_attention_rows(q, k, v, rows: torch.Tensor, scale: Optional[float], chunk: int = 32) -> torch.Tensor:
    """Softmax attention over all tokens for query ``rows`` of batch 0: ``[R, H, D]`` in float32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kf, vf = k[0].float(), v[0].float()
    outs = []
    for part in rows.split(chunk):
        scores = torch.einsum('rhd,nhd->hrn', q[0, part].float(), kf) * scale
        outs.append(torch.einsum('hrn,nhd->rhd', scores.softmax(-1), vf))
    return torch.cat(outs)


def make_sdpa_dense(case: BlockSparseCase) -> OpImpl:
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=case.scale)

    def check(out, q, k, v):
        rows = torch.linspace(0, case.seq_len - 1, min(DENSE_CHECK_ROWS, case.seq_len), device=q.device).long()
        return relative_error(out[0, rows], dense_attention_rows(q, k, v, rows, case.scale))
    return OpImpl('sdpa-dense', fn, layout='heads_first', note='all tokens, no mask (upper bound)', check=check,
                  check_what='dense attention')


def make_sdpa_masked(case: BlockSparseCase, device: torch.device) -> OpImpl:
    elements = case.batch * case.heads * case.seq_len ** 2
    budget = MASKED_MAX_ELEMENTS.get(device.type, MASKED_MAX_ELEMENTS['cpu'])
    if elements > budget:
        return OpImpl('sdpa-masked', skip=f'B*H*N*N = {elements / 2 ** 20:,.0f}Mi mask elements exceed the '
                                          f'{budget / 2 ** 20:,.0f}Mi budget on {device.type}')
    kwargs = device_index(case, device)
    mask = block_sparse_mask(kwargs['kv_indices'], kwargs['kv_num_blocks'], case.offsets, case.offsets,
                             kwargs['key_mask'], case.is_causal)  # [B|1, H|1, N, N]

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=case.scale)
    return OpImpl('sdpa-masked', fn, layout='heads_first')


def flex_block_size(case: BlockSparseCase) -> Optional[int]:
    """The case's uniform block size when FlexAttention can use it as its sparse block, else None."""
    size = case.block_size
    if size is None or size < FLEX_MIN_BLOCK or size & (size - 1):
        return None
    return size


def split_full_blocks(case: BlockSparseCase, block: int) -> Tuple[torch.Tensor, ...]:
    """The index as FlexAttention's partial and full block lists ``(kv_num_blocks, kv_indices,
    full_kv_num_blocks, full_kv_indices)``, each list ``[B|1, H|1, blocks, blocks]`` wide: a listed block is
    full when causality and ``key_mask`` hide none of its keys from any query of the query block."""
    num_blocks, slots = case.num_blocks, case.kv_indices.shape[-1]
    ids = case.kv_indices.long()
    used = case.valid_slots()
    full = used.clone()
    if case.is_causal:  # a key block is full when it ends at or before the query block's first query
        starts = torch.arange(num_blocks)[:, None] * block
        full &= (ids + 1) * block <= starts + 1
    if case.key_mask is not None:
        block_ok = torch.ones(num_blocks * block, dtype=torch.bool)
        block_ok[:case.seq_len] = case.key_mask.all(0)
        full &= block_ok.view(num_blocks, block).all(-1)[ids]
    lists = []
    for chosen in (used & ~full, full):
        order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True)  # chosen slots first, in slot order
        indices = torch.zeros(*ids.shape[:3], num_blocks, dtype=torch.int32)
        indices[..., :slots] = torch.where(torch.arange(slots) < chosen.sum(-1, keepdim=True),
                                           ids.gather(-1, order), 0).to(torch.int32)
        lists += [chosen.sum(-1).to(torch.int32), indices]
    return tuple(lists)


def flex_mask_mod(case: BlockSparseCase, device: torch.device):
    """``mask_mod(b, h, q_idx, kv_idx)`` of the exact pattern: the listed blocks (looked up through token -> block
    tables, the dense mask without its N^2 memory), ``key_mask`` and causality. Eager FlexAttention evaluates it
    everywhere; compiled, only inside partial blocks."""
    allowed = case.block_allowed().to(device).expand(case.batch, case.heads, -1, -1)
    block_of = torch.repeat_interleave(torch.arange(case.num_blocks), torch.tensor(case.offsets).diff()).to(device)
    key_mask = None if case.key_mask is None else case.key_mask.to(device).expand(case.batch, -1)
    causal = case.is_causal

    def mask_mod(b, h, q_idx, kv_idx):
        keep = allowed[b, h, block_of[q_idx], block_of[kv_idx]]
        if causal:
            keep = keep & (kv_idx <= q_idx)
        if key_mask is not None:
            keep = keep & key_mask[b, kv_idx]
        return keep
    return mask_mod


def flex_block_mask(case: BlockSparseCase, device: torch.device) -> Tuple[object, str]:
    """The BlockMask of the case and a note saying how it was built."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    mask_mod = flex_mask_mod(case, device)
    block = flex_block_size(case)
    if block is not None:
        tensors = [t.to(device) for t in split_full_blocks(case, block)]
        block_mask = BlockMask.from_kv_blocks(*tensors, BLOCK_SIZE=block, mask_mod=mask_mod,
                                              seq_lengths=(case.seq_len, case.seq_len))
        return block_mask, f'from_kv_blocks, {block}-token blocks'
    per_batch = case.kv_indices.shape[0] > 1 or (case.key_mask is not None and case.key_mask.shape[0] > 1)
    block_mask = create_block_mask(mask_mod, B=case.batch if per_batch else None,
                                   H=case.heads if case.kv_indices.shape[1] > 1 else None, Q_LEN=case.seq_len,
                                   KV_LEN=case.seq_len, device=device, _compile=device.type == 'cuda')
    return block_mask, f'mask_mod on 128-token tiles, block sparsity {block_mask.sparsity():.0f}%'


def make_flex(case: BlockSparseCase, device: torch.device, with_flex: bool) -> OpImpl:
    if device.type == 'cpu' and not with_flex:
        return OpImpl('flex', skip='on CPU compiling flex_attention costs ~10-20 s per shape; pass --with-flex')
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as err:
        return OpImpl('flex', skip=f'flex_attention unavailable ({err})')
    torch._dynamo.reset()  # one compiled graph per case; avoids the recompile limit across many shapes
    block_mask, how = flex_block_mask(case, device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v):
        return compiled(q, k, v, block_mask=block_mask, scale=case.scale)
    no_backward = 'flex_attention has no backward on CPU' if device.type == 'cpu' else None
    return OpImpl('flex', fn, layout='heads_first', no_backward=no_backward, note=how)


def build_block_sparse_impls(case: BlockSparseCase, device: torch.device, names: Sequence[str],
                             with_flex: bool) -> List[OpImpl]:
    """Every requested implementation for ``case``; those that cannot run carry a ``skip`` reason."""
    return build_impls({
        'visionmix': lambda: make_visionmix(case, device, 'auto'),
        'visionmix-ref': lambda: make_visionmix(case, device, 'torch'),
        'sdpa-dense': lambda: make_sdpa_dense(case),
        'sdpa-masked': lambda: make_sdpa_masked(case, device),
        'flex': lambda: make_flex(case, device, with_flex),
    }, names)


def make_block_sparse_inputs(case: BlockSparseCase, device: torch.device,
                             dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    return random_inputs(case.shape, device, dtype)


def benchmark_block_sparse_case(case: BlockSparseCase, args, device: torch.device, dtype: torch.dtype) -> List[dict]:
    """All rows (implementations x modes) for one case."""
    impls = build_block_sparse_impls(case, device, args.impls, args.with_flex)
    q, k, v = make_block_sparse_inputs(case, device, dtype)
    rows = benchmark_case(case, impls, q, k, v, args, device, dtype)
    del q, k, v, impls
    free_memory(device)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Command line


def custom_block_sparse_case(args, parser: argparse.ArgumentParser) -> BlockSparseCase:
    """The one uniform case of ``--shape`` (``N`` tokens or ``BxNxHEADSxD``), ``--block-size`` and ``--topk`` or
    ``--density`` (random key blocks per query block, shared across batch and heads); ``--causal`` makes it
    block-causal (own block plus random earlier ones, causal inside the own block)."""
    dims = parse_dims(args.shape, '--shape', parser)
    batch, heads, head_dim = args.batch, args.heads, args.head_dim
    if len(dims) == 4:
        given = [flag for flag, value in (('--batch', args.batch), ('--heads', args.heads),
                                          ('--head-dim', args.head_dim)) if value is not None]
        if given:
            parser.error(f'--shape {args.shape} already sets batch, heads and head_dim; drop {", ".join(given)}')
        batch, tokens, heads, head_dim = dims
    elif len(dims) == 1:
        tokens = dims[0]
    else:
        parser.error(f'--shape for block_sparse takes the token count N or the full heads-last shape BxNxHEADSxD, '
                     f'got {args.shape!r}')
    block_size = CUSTOM_BLOCK_SIZE if args.block_size is None else args.block_size
    if block_size < 1 or block_size > tokens:
        parser.error(f'--block-size must lie in [1, tokens = {tokens}], got {block_size}')
    num_blocks = -(-tokens // block_size)
    if args.topk is not None and args.density is not None:
        parser.error('--topk and --density both set the blocks per query block; give one')
    if args.topk is not None:
        if not 1 <= args.topk <= num_blocks:
            parser.error(f'--topk must lie in [1, {num_blocks}] (the key blocks of {tokens} tokens in blocks of '
                         f'{block_size}), got {args.topk}')
        topk = args.topk
    else:
        density = CUSTOM_DENSITY if args.density is None else args.density
        if not 0 < density <= 1:
            parser.error(f'--density is the fraction of key blocks per query block, in (0, 1]; got {density}')
        topk = min(num_blocks, max(1, round(density * num_blocks)))
    name = f'random-{tokens}-b{block_size}-top{topk}' + ('-causal' if args.causal else '')
    pattern = f'random top-{topk}' + (' causal' if args.causal else '')
    return uniform_case(name, tokens, block_size, topk, heads or 4, head_dim or 32, batch or default_batch(args),
                        args.causal, pattern, shared_heads=True)


def validate_block_sparse_case(case: BlockSparseCase, parser: argparse.ArgumentParser) -> None:
    """Let visionmix check the index and shapes (on stand-in tensors without storage) before any timing."""
    q = torch.zeros(()).expand(case.shape)
    key_mask = None if case.key_mask is None else case.key_mask.expand(case.batch, -1)
    try:
        check_args(q, q, q, case.kv_indices, case.kv_num_blocks, case.offsets, case.offsets, key_mask, True)
    except ValueError as err:
        parser.error(f'case {case.name}: {err}')


def select_cases(cases: List[BlockSparseCase], patterns: str, parser: argparse.ArgumentParser):
    wanted = [p.strip() for p in patterns.split(',') if p.strip()]
    chosen = [case for case in cases if any(fnmatch.fnmatchcase(case.name, p) for p in wanted)]
    if not chosen:
        parser.error(f'--cases {patterns!r} matches no default case on this device; they are '
                     f'{", ".join(case.name for case in cases)}')
    return chosen


def run(args, parser: argparse.ArgumentParser) -> Tuple[dict, str]:
    """Benchmark block-sparse attention over the default cases of the device (those matching ``--cases``), or the
    one custom case; returns the result and file stem."""
    if args.shape is not None:
        cases = [custom_block_sparse_case(args, parser)]
    else:
        cases = default_block_sparse_cases(args.device, args.batch)
        if args.cases:
            cases = select_cases(cases, args.cases, parser)
        if args.device.type != 'cuda':
            args.notes.append('CPU default cases: small versions of the GPU cases (see benchmarks/README.md)')
    for case in cases:
        validate_block_sparse_case(case, parser)
    dtype = DTYPES[args.dtype]
    rows = []
    for case in tqdm(cases, desc=f'block_sparse {args.mode} {args.dtype}', unit='case', file=sys.stderr):
        rows += benchmark_block_sparse_case(case, args, args.device, dtype)
    add_ratios(rows, 'case')
    result = result_header(args, 'op', f'block-sparse attention {args.mode} {args.dtype}')
    result.update(op='block_sparse', rows=rows)
    stem = f'block_sparse_{args.mode}_{args.dtype}'
    if args.shape is not None:
        stem += f'_{cases[0].name}'
    elif args.cases:
        stem += '_' + ''.join(c if c.isalnum() or c in '-_' else '_' for c in args.cases)
    return result, stem
