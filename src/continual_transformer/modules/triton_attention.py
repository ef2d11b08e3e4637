"""One-token decoding attention as one Triton kernel: a program per (row, key/value head) reads that head's
cached keys and values once for its group of query heads.

A decoding step of a small model on a GPU is bound by how many kernels it launches and how long each takes
to start, not by arithmetic. A library attention kernel is tiled for many queries where decoding has one per
row and query head: cuDNN's takes ~13 us a layer at 64 rows on an H200 (plus a workspace memset), the
generated reductions (:func:`~continual_transformer.modules.grouped_attention.reduced_attention`) three
kernels. :func:`decode_attention` is one kernel with an online softmax over blocks of cached positions
(the flash-decoding recurrence without the split over positions; at one row the whole cache in one
block up to 256 positions), the group's query heads padded to one
tensor-core tile. It runs as a ``torch.library`` Triton op, so a compiled decoding step calls it as one of
its own kernels (and records it in its CUDA graph).

Triton runs on CUDA devices; with ``TRITON_INTERPRET=1`` its interpreter runs the same kernel on CPU
tensors (the tests).
"""

from __future__ import annotations

import logging
import os

import torch

try:  # shipped with PyTorch's CUDA builds, not its CPU ones
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the kernel is then never launched (available() is False)
    triton = tl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

BLOCK_ELEMENTS = 16384
"""Most cached keys' elements (positions x padded dimensions) a program reads per loop iteration when the
programs are few (:data:`FEW_PROGRAMS`): 256 positions at 64 dimensions, 128 at 128."""

FEW_PROGRAMS = 32
"""Launches of at most this many programs (rows x key/value heads) read the cache in blocks of up to
:data:`BLOCK_ELEMENTS`; more programs read it in blocks of :data:`BLOCK_POSITIONS`."""

BLOCK_POSITIONS = 64
"""Cached positions a program reads per loop iteration where the programs are many."""


def block_positions(length: int, dim: int, programs: int = 1) -> int:
    """Cached positions a program reads per loop iteration, for a cache of ``length`` positions of ``dim``
    dimensions read by ``programs`` programs. A program walks its blocks one after another, each waiting for
    its loads: when the programs are few (one row: a program per key/value head), all of the cache at once
    (the next power of two, at least 16) up to :data:`BLOCK_ELEMENTS` elements. When they are many, small
    blocks keep more programs on each multiprocessor. H200, bf16, 3 key/value heads, 136 positions
    (``benchmarks/results/speed/h200-13``): at one row 4.32 us a call with one block against 4.56 with blocks
    of 64; at 64 rows 9.20 against 6.95, at 256 rows 24.58 against 14.13."""
    if programs > FEW_PROGRAMS:
        return min(BLOCK_POSITIONS, max(16, _power_of_two(length)))
    most = max(16, BLOCK_ELEMENTS // max(16, _power_of_two(dim)))
    return min(most, max(16, _power_of_two(length)))


def _power_of_two(n: int) -> int:
    """The least power of two of at least ``n``: Triton's ``next_power_of_2``, written here so that
    :func:`block_positions`, which a compiled decoding step traces, calls nothing outside this module."""
    return 1 << max(0, n - 1).bit_length()


def available() -> bool:
    """Whether the kernel exists: Triton is importable and took the kernel and its op."""
    return _kernel is not None and _op is not None


def step_runs(tensor: torch.Tensor) -> bool:
    """Whether :func:`decode_step` can run on ``tensor``'s device: a CUDA device with the kernel's step op,
    or Triton's interpreter (CPU tensors)."""
    return _step_op is not None and (tensor.is_cuda or interpreting())


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``: CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _body(  # the kernel's source (Triton's language): see _kernel
    query,
    keys,
    values,
    mask,
    out,
    scale,
    length,
    value_offset,  # STEP: where the values start in ``keys``, a paired cache
    query_row,
    query_head,
    query_group,
    key_row,
    key_head,
    key_position,
    value_row,
    value_head,
    value_position,
    mask_row,
    mask_position,
    new_key,  # STEP: the new token's keys and values, its rotary cos and sin, and where to write them
    new_value,
    cos,
    sin,
    position,
    new_key_row,
    new_key_head,
    new_value_row,
    new_value_head,
    rotary_row,
    GROUPS: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    BLOCK_POSITIONS: tl.constexpr,
    MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    STEP: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    groups = tl.arange(0, BLOCK_GROUPS)
    dims = tl.arange(0, BLOCK_DIM)
    group_ok = groups < GROUPS
    dim_ok = dims < DIM
    if STEP:  # a paired cache, passed once (the op's one mutated tensor): values start value_offset in
        values = keys + value_offset
    at = query + row * query_row + head * query_head + groups[:, None] * query_group
    queries = tl.load(at + dims[None, :], mask=group_ok[:, None] & dim_ok[None, :], other=0.0)
    if STEP:  # rotate the queries and the new key (written at the cache's length after the attention)
        capacity = length  # the cache's positions; a new token past them is attended but not written
        length = tl.minimum(tl.load(position).to(tl.int32), capacity)  # positions cached before it
        written = dim_ok & (dims * 0 + length < capacity)  # (a block: the interpreter masks with blocks)
        # Hugging Face's rotate_half: x * cos + cat(-x[D/2:], x[:D/2]) * sin, in float32
        half = (dims + DIM // 2) % DIM
        sign = tl.where(dims < DIM // 2, -1.0, 1.0)
        cosine = tl.load(cos + row * rotary_row + dims, mask=dim_ok, other=0.0).to(tl.float32)
        sine = tl.load(sin + row * rotary_row + dims, mask=dim_ok, other=0.0).to(tl.float32) * sign
        halves = tl.load(at + half[None, :], mask=group_ok[:, None] & dim_ok[None, :], other=0.0)
        queries = queries.to(tl.float32) * cosine[None, :] + halves.to(tl.float32) * sine[None, :]
        key_at = new_key + row * new_key_row + head * new_key_head
        fresh = tl.load(key_at + dims, mask=dim_ok, other=0.0).to(tl.float32) * cosine
        fresh = (fresh + tl.load(key_at + half, mask=dim_ok, other=0.0).to(tl.float32) * sine).to(
            keys.dtype.element_ty
        )
        fresh_value = tl.load(
            new_value + row * new_value_row + head * new_value_head + dims, mask=dim_ok, other=0.0
        ).to(values.dtype.element_ty)
    queries = queries.to(keys.dtype.element_ty)
    best = tl.full([BLOCK_GROUPS], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_GROUPS], tl.float32)
    acc = tl.zeros([BLOCK_GROUPS, BLOCK_DIM], tl.float32)
    for start in range(0, length, BLOCK_POSITIONS):
        positions = start + tl.arange(0, BLOCK_POSITIONS)
        inside = positions < length
        block = inside[:, None] & dim_ok[None, :]
        key = tl.load(
            keys + row * key_row + head * key_head + positions[:, None] * key_position + dims[None, :],
            mask=block,
            other=0.0,
        )
        # (groups, positions) in float32 (a compiled graph passes the scale as a double)
        scores = (tl.dot(queries, tl.trans(key), input_precision=PRECISION) * scale).to(tl.float32)
        if MASK == 1:  # boolean: True attends
            seen = tl.load(mask + row * mask_row + positions * mask_position, mask=inside, other=0) != 0
            scores = tl.where((seen & inside)[None, :], scores, float("-inf"))
        elif MASK == 2:  # additive
            added = tl.load(mask + row * mask_row + positions * mask_position, mask=inside, other=0.0)
            scores = tl.where(inside[None, :], scores + added.to(tl.float32)[None, :], float("-inf"))
        else:
            scores = tl.where(inside[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # a block with nothing seen yet
        weights = tl.exp(scores - shift[:, None])
        rescale = tl.exp(best - shift)
        total = total * rescale + tl.sum(weights, 1)
        value = tl.load(
            values
            + row * value_row
            + head * value_head
            + positions[:, None] * value_position
            + dims[None, :],
            mask=block,
            other=0.0,
        )
        acc = acc * rescale[:, None] + tl.dot(weights.to(value.dtype), value, input_precision=PRECISION)
        best = new_best
    if STEP:  # the new token, from registers: the same recurrence over one position
        scores = tl.sum(queries.to(tl.float32) * fresh.to(tl.float32)[None, :], 1) * scale
        column = (
            mask + row * mask_row + tl.minimum(length, capacity - 1) * mask_position
        )  # past the end: seen
        if MASK == 1:
            scores = tl.where((tl.load(column) != 0) | (length >= capacity), scores, float("-inf"))
        elif MASK == 2:
            scores = scores + tl.where(length < capacity, tl.load(column).to(tl.float32), 0.0)
        new_best = tl.maximum(best, scores)
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)
        weights = tl.exp(scores - shift)
        rescale = tl.exp(best - shift)
        total = total * rescale + weights
        acc = acc * rescale[:, None] + weights[:, None] * fresh_value.to(tl.float32)[None, :]
    result = acc / total[:, None]
    heads = head * GROUPS + groups  # out: (B, 1, H, D) contiguous
    tl.store(
        out + row * tl.num_programs(1) * GROUPS * DIM + heads[:, None] * DIM + dims[None, :],
        result.to(out.dtype.element_ty),
        mask=group_ok[:, None] & dim_ok[None, :],
    )
    if STEP:  # last: no store to the cache comes before the loop's loads from it
        at_length = length * key_position + dims
        tl.store(keys + row * key_row + head * key_head + at_length, fresh, mask=written)
        at_length = length * value_position + dims
        tl.store(values + row * value_row + head * value_head + at_length, fresh_value, mask=written)


def _launch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    block: int,
) -> torch.Tensor:
    return _run(query, key, value, mask, scale, block, key.shape[2])


def _launch_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pair: torch.Tensor,
    position: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    block: int,
) -> torch.Tensor:
    # keys and values are pair's halves, passed as pair itself and its values' offset (a tensor passed twice
    # would be two tensors to the op's functional form); value stands in for the values' argument
    step = (key, value, cos, sin, position, *key.stride()[:2], *value.stride()[:2], cos.stride(0))
    return _run(query, pair, value, mask, scale, block, pair.shape[3], step, pair.stride(0))


def _run(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    block: int,
    length: int,
    step: tuple | None = None,
    value_offset: int = 0,
) -> torch.Tensor:
    """Launch the kernel: attention over ``key``/``value`` (B, KV, L, D), or with ``step`` (the new key,
    value, cos, sin, position and their strides) over ``key``, a paired cache (2, B, KV, L, D) whose values
    start ``value_offset`` elements in (``value`` unread)."""
    rows, kv_heads, groups, dim = query.shape
    block_dim = max(16, triton.next_power_of_2(dim))
    out = torch.empty((rows, 1, kv_heads * groups, dim), dtype=query.dtype, device=query.device)
    kind = 0 if mask is None else 1 if mask.dtype == torch.bool else 2
    flat = mask[:, 0, 0, :] if mask is not None else key.new_empty(1)  # (B or 1, L)
    mask_row = 0 if mask is None or flat.shape[0] == 1 else flat.stride(0)
    mask_position = flat.stride(-1) if mask is not None else 0
    cache = key.stride()[-4:-1] if step is not None else key.stride()[:3]  # (row, head, position)
    kernel = _kernel if interpreting() else torch.library.wrap_triton(_kernel)
    kernel[(rows, kv_heads)](
        query,
        key,
        value,
        flat,
        out,
        scale,
        length,
        value_offset,
        *query.stride()[:3],
        *cache,
        *(cache if step is not None else value.stride()[:3]),
        mask_row,
        mask_position,
        *(step if step is not None else (key, key, key, key, key, 0, 0, 0, 0, 0)),
        GROUPS=groups,
        BLOCK_GROUPS=max(16, triton.next_power_of_2(groups)),
        DIM=dim,
        BLOCK_DIM=block_dim,
        BLOCK_POSITIONS=block,
        MASK=kind,
        PRECISION="ieee" if key.dtype == torch.float32 else "tf32",  # float32 kept exact, not TF32
        STEP=step is not None,
        num_warps=8 if block * block_dim > 8192 else 4,
    )
    return out


@torch.compiler.disable
def _interpret(launch, *args):  # noqa: ANN001, ANN002, ANN202
    """Run ``launch`` in Triton's interpreter outside any compiled graph (a compiled step on CPU tensors
    breaks its graph here: the interpreter is numpy, not something to trace)."""
    return launch(*args)


_kernel = _op = _step_op = None
"""The jitted kernel (under ``TRITON_INTERPRET=1`` at import, Triton's interpreter runs it),
``ctt::decode_attention``, the kernel as a Triton op (a compiled graph calls it as one of its kernels), and
``ctt::decode_attention_step``, the kernel with the rotary embedding and the cache write (which mutates the
paired cache)."""
if triton is not None:
    try:
        _kernel = triton.jit(_body)
        _op = torch.library.triton_op("ctt::decode_attention", _launch, mutates_args=())
        _step_op = torch.library.triton_op("ctt::decode_attention_step", _launch_step, mutates_args={"pair"})
    except Exception as exc:  # a Triton or PyTorch without what the kernel needs: PyTorch's kernels decode
        logger.warning("the Triton decoding attention is not available (%s)", exc)
        _kernel = _op = _step_op = None


def _block(block: int | None, length: int, dim: int, programs: int) -> int:
    """``block`` checked (a power of two of at least 16), or by default :func:`block_positions`'."""
    if block is None:
        return block_positions(length, dim, programs)
    if block < 16 or block & (block - 1):
        raise ValueError(f"decode attention: block {block} is not a power of two of at least 16")
    return block


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    block: int | None = None,
) -> torch.Tensor:
    """Attention of one new token per row: query (B, KV, G, D), one row per query head of each key/value
    head; key and value (B, KV, L, D), any strides along B, KV and L; ``mask`` (B or 1, 1, 1, L), boolean
    (True attends) or additive, or ``None``. Returns (B, 1, KV * G, D), as Hugging Face's attention
    functions do. Scores and the softmax are float32; the products run in the keys' dtype (float32 ones in
    full float32, not TF32). ``block``: cached positions per loop iteration, a power of two of at least 16
    (default :func:`block_positions` for B x KV programs)."""
    block = _block(block, key.shape[2], query.shape[-1], query.shape[0] * query.shape[1])
    if query.shape[-1] != key.shape[-1] or (mask is not None and mask.shape[-1] != key.shape[2]):
        raise ValueError(
            f"decode attention: query {tuple(query.shape)}, key {tuple(key.shape)} and mask "
            f"{None if mask is None else tuple(mask.shape)} do not fit"
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    if interpreting():  # the interpreter runs on CPU tensors, outside the op's device dispatch
        return _interpret(_launch, query, key, value, mask, scale, block)
    return _op(query, key, value, mask, scale, block)


def decode_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pair: torch.Tensor,
    position: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    block: int | None = None,
) -> torch.Tensor:
    """One new token per row, as one kernel: the rotary embedding of its queries and key (Hugging Face's
    ``apply_rotary_pos_emb``, computed in float32), the write of its key and value into a paired cache at
    ``position`` (a 0-d integer tensor: the positions before it are cached), and its attention over those
    positions and itself. A position past the cache's end is not written (the cache's positions and the
    new token are attended). query (B, KV, G, D) and key and value (B, KV, D) before the embedding, any
    strides but the last; cos and sin (B, D); pair (2, B, KV, L, D), the keys and values of
    :class:`~continual_transformer.modules.paired_cache.PairedLayer`; mask (B or 1, 1, 1, L) as for
    :func:`decode_attention`, whose result this returns. The counter at ``position`` is not moved."""
    rows, kv_heads, groups, dim = query.shape
    block = _block(block, pair.shape[3], dim, rows * kv_heads)
    if (
        dim % 2
        or key.shape != value.shape
        or key.shape != (rows, kv_heads, dim)
        or pair.shape[:3] != (2, rows, kv_heads)
        or pair.shape[-1] != dim
        or cos.shape != sin.shape
        or cos.shape[-1] != dim
        or cos.shape[0] not in (1, rows)
        or position.numel() != 1
        or (mask is not None and mask.shape[-1] != pair.shape[3])
    ):
        raise ValueError(
            f"decode attention step: query {tuple(query.shape)}, key {tuple(key.shape)}, value "
            f"{tuple(value.shape)}, cos {tuple(cos.shape)}, cache {tuple(pair.shape)} and mask "
            f"{None if mask is None else tuple(mask.shape)} do not fit"
        )
    scale = dim**-0.5 if scaling is None else float(scaling)
    query, key, value, cos, sin = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value, cos, sin)
    )
    if cos.shape[0] == 1 and rows > 1:  # one position for every row: a row stride of 0
        cos, sin = cos.expand(rows, dim), sin.expand(rows, dim)
    position = position.reshape(())
    if interpreting():
        return _interpret(_launch_step, query, key, value, cos, sin, pair, position, mask, scale, block)
    return _step_op(query, key, value, cos, sin, pair, position, mask, scale, block)
