"""The decoding attention alone, one new token per row, on a GPU: each kernel the grouped decoding attention
can run (``generation.decode_attention_kernel`` and ``reduced_attention_rows``) timed side by side on the
same inputs, and each one's answer against float32 attention over repeated keys and values.

Kernels: ``triton`` (:mod:`continual_transformer.modules.triton_attention`, one kernel; ``triton-N``: with
a fixed block of N positions, e.g. ``triton-64``, the block before it was chosen by the length), ``step``
(:func:`~continual_transformer.modules.triton_attention.decode_step`: the same kernel also rotating the
queries and the new key, an identity rotation here, and writing the new key and value at the last
position, which it attends from registers), ``auto``
(PyTorch's choice, cuDNN's on an H200: the setting's ``library``), ``efficient`` (the memory-efficient
kernel) and ``reduced`` (:func:`~continual_transformer.modules.grouped_attention.reduced_attention`,
compiled). Each is recorded as a CUDA graph of ``--layers`` calls (what a recorded decoding step replays: one
call per layer, on that layer's own cache) and the graph is replayed; the figure is microseconds per call.
SmolLM2-135M's shapes by default (9 query heads, 3 key/value heads, 64 dimensions).

    python benchmarks/attention_kernels.py --rows 1,64,256 --lengths 136,520 --out benchmarks/results/x

Writes ``results.json`` and ``results.md`` to ``--out``, with the machine and the settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from transformers.integrations.sdpa_attention import repeat_kv

from continual_transformer.modules.grouped_attention import KERNELS, reduced_attention
from continual_transformer.modules.triton_attention import decode_attention, decode_step

logger = logging.getLogger("attention_kernels")

VARIANTS = ("triton", "triton-64", "step", "auto", "efficient", "reduced")


def _function(variant: str) -> Any:
    """``variant``'s attention of grouped queries (B, KV, G, D): (B, KV, G, D) or (B, 1, H, D) out."""
    if variant == "triton":
        return decode_attention
    if variant.startswith("triton-"):  # a fixed block of positions, e.g. triton-64
        block = int(variant.removeprefix("triton-"))
        return lambda query, key, value, mask, scaling: decode_attention(
            query, key, value, mask, scaling, block
        )
    if variant == "reduced":
        return torch.compile(reduced_attention, dynamic=False)
    if variant == "step":
        return decode_step

    def library(query, key, value, mask, scaling):
        if variant == "auto":
            return torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=scaling
            )
        with torch.nn.attention.sdpa_kernel([KERNELS[variant]]):
            return torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=scaling
            )

    return library


def measure(variant: str, rows: int, length: int, args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    heads, kv_heads, dim = args.heads, args.kv_heads, args.dim
    groups = heads // kv_heads
    generator = torch.Generator(device=device).manual_seed(rows * 1000 + length)
    query = torch.randn(rows, heads, 1, dim, generator=generator, device=device, dtype=dtype)
    caches = torch.randn(
        args.layers, 2, rows, kv_heads, length, dim, generator=generator, device=device, dtype=dtype
    )
    seen = torch.rand(rows, 1, 1, length, generator=generator, device=device) > 0.2  # left padding, holes
    seen[..., -1] = True
    function = _function(variant)
    grouped = query.reshape(rows, kv_heads, groups, dim)

    if variant == "step":  # the last position is the new token's: its key and value written again
        cos, sin = (
            torch.ones(rows, dim, device=device, dtype=dtype),
            torch.zeros(rows, dim, device=device, dtype=dtype),
        )
        position = torch.tensor(length - 1, device=device)

        def call(layer: int) -> torch.Tensor:
            new_key, new_value = caches[layer, 0, :, :, -1], caches[layer, 1, :, :, -1]  # views: no copy
            out = decode_step(grouped, new_key, new_value, cos, sin, caches[layer], position, seen, None)
            return out.reshape(rows, kv_heads * groups, dim)

    else:

        def call(layer: int) -> torch.Tensor:
            out = function(grouped, caches[layer, 0], caches[layer, 1], seen, None)
            return out.reshape(rows, kv_heads * groups, dim)

    reference = torch.nn.functional.scaled_dot_product_attention(
        query.float(),
        repeat_kv(caches[0, 0].float(), groups),
        repeat_kv(caches[0, 1].float(), groups),
        attn_mask=seen,
    ).reshape(rows, heads, dim)
    error = (call(0).float() - reference).abs().max().item()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compiles (reduced), tunes, allocates
            for layer in range(args.layers):
                call(layer)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(args.layers):
            call(layer)
    graph.replay()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(args.reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    microseconds = begin.elapsed_time(end) * 1000 / (args.reps * args.layers)
    return {
        "variant": variant,
        "rows": rows,
        "length": length,
        "us_per_call": microseconds,
        "max_error": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1,64,256")
    parser.add_argument("--lengths", default="136,520")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attention_kernels/local"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not torch.cuda.is_available():
        sys.exit("attention_kernels: needs a CUDA device")
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        for length in (int(n) for n in args.lengths.split(",")):
            for variant in args.variants.split(","):
                try:
                    results.append(measure(variant, rows, length, args))
                except Exception as exc:  # a kernel that cannot run these shapes: recorded, the rest go on
                    results.append({"variant": variant, "rows": rows, "length": length, "error": repr(exc)})
                logger.info("%s", json.dumps(results[-1]))
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "command": " ".join(sys.argv),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [
        "# Decoding attention, one new token per row",
        "",
        f"{meta['device']}, torch {meta['torch']}, {args.dtype}, {args.heads} query heads, {args.kv_heads} "
        f"key/value heads, {args.dim} dimensions; each call one layer's cache, {args.layers} calls a CUDA "
        f"graph, {args.reps} replays. Command: `{meta['command']}`",
        "",
        "| rows | cached positions | kernel | us per call | vs auto | max abs error vs float32 |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    by_key = {(r["rows"], r["length"], r["variant"]): r for r in results}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['rows']} | {r['length']} | {r['variant']} | failed: {r['error'][:80]} | | |")
            continue
        auto = by_key.get((r["rows"], r["length"], "auto"), {}).get("us_per_call")
        ratio = f"{auto / r['us_per_call']:.2f}x" if auto else ""
        cells = (
            r["rows"],
            r["length"],
            r["variant"],
            f"{r['us_per_call']:.2f}",
            ratio,
            f"{r['max_error']:.2e}",
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
