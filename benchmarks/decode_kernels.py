"""Kernels per decoding step of the compiled lean loop, counted in the code inductor generates for it.

The step (:meth:`Backbone._lean_step`, one new token per row against a static KV cache) is compiled once per
variant (``--variants``: ``unfused``, ``fused``, i.e. ``generation.fused_projections``, ``grouped``:
fused with the grouped decoding attention, ``generation.decode_attention``, ``reduced_attention``: grouped
with the attention as generated reductions, ``generation.reduced_attention_rows``, ``reduced``: that with
every product as a reduction too, ``generation.reduced_rows``, and ``unpaired``: ``reduced`` with keys and
values cached in two tensors, ``generation.paired_cache`` off; every variant but ``unpaired`` on the paired
cache; ``separate``: ``grouped`` with Hugging Face's attention layers around the Triton kernel,
``generation.attention_step_rows: 0``, where the others run one-kernel steps), after a prompt ran
into the cache, and the launches in the generated ``call`` functions are counted by kind: matrix products
inductor hands to a library (``extern``), kernels it generated (``cpp`` on a CPU, ``triton`` on a GPU) and
ATen fallbacks. A model with ``--layers`` fewer layers (random weights of the same shapes) gives the per-layer
count at a fraction of the compile time; ``--inductor name=value`` (repeatable, the value read as JSON where
it parses) sets inductor options to compare, e.g. ``--inductor coordinate_descent_tuning=true`` or
``--inductor 'pre_grad_fusion_options={"batch_linear_lhs": {}}'``.

    python benchmarks/decode_kernels.py --layers 2 --device cpu       # CPU, under a minute per variant
    python benchmarks/decode_kernels.py --batch 1,64 --profile --out /tmp/kernels   # the model on a GPU

With ``--profile`` on a GPU each compiled step is also recorded as a CUDA graph and timed (what a recorded
chunk replays per token, without the token picking), the eager prompt pass of the same rows is timed, and
the step's kernels are listed as the profiler sees them run from the host (count and GPU time per step,
the longest first): where the time of a step goes at 1 and at 64 rows.

Writes ``kernels.json`` (and the generated code per variant) to ``--out`` when given, prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from continual_transformer.backbone import Backbone
from continual_transformer.config import load_config

logger = logging.getLogger("decode_kernels")

_LAUNCH = {
    "extern": re.compile(r"^\s+(?:buf\w+ = )?extern_kernels\.(\w+)\("),
    "cpp": re.compile(r"^\s+(cpp_fused_\w+)\("),
    "triton": re.compile(r"^\s+(triton_\w+)\.run\("),
    "aten": re.compile(r"^\s+(?:buf\w+ = )?torch\.ops\.(\w+\.\w+)"),
}


def count_launches(codes: list[str]) -> dict[str, Any]:
    """Kernel launches by kind in inductor's generated modules (indented calls only, i.e. inside ``call``),
    and every name of each kind, the most frequent first."""
    kinds: Counter[str] = Counter()
    names: dict[str, Counter[str]] = {k: Counter() for k in _LAUNCH}
    for code in codes:
        for line in code.splitlines():
            for kind, pattern in _LAUNCH.items():
                match = pattern.match(line)
                if match:
                    kinds[kind] += 1
                    # generated kernels are numbered per graph: count them by what they fuse
                    names[kind][re.sub(r"_\d+$", "", match.group(1))] += 1
                    break
    return {
        "total": sum(kinds.values()),
        "by_kind": dict(kinds),
        "top": {
            k: dict(c.most_common()) for k, c in names.items() if c
        },  # every name, the most frequent first
    }


def step_code(
    backbone: Backbone, batch: int, length: int, *, profile: bool
) -> tuple[list[str], float, dict[str, Any]]:
    """The generated code of one compiled decoding step of ``batch`` rows against a cache of ``length``
    positions (a random prompt of ``length - 72`` tokens in it, as a 64-token bucket leaves for 64 new
    tokens), the compile seconds and, with ``profile`` on a GPU, the step's timings (:func:`profile_step`)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    backbone._lean_steps.clear()
    backbone._lean_caches.clear()
    step = backbone._lean_step("default")
    vocab = backbone.model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    width = max(8, length - 72)
    ids = torch.randint(0, vocab, (batch, width), generator=generator).to(backbone.device)
    mask = torch.ones_like(ids)
    full_mask = torch.ones((batch, length), dtype=mask.dtype, device=mask.device)
    timings: dict[str, Any] = {}
    with (
        torch.inference_mode(),
        backbone._fused_projections("default", batch),
        backbone._grouped_attention("default", batch),
    ):
        cache = backbone._lean_cache(batch, length)
        logits, position = backbone._prefill(ids, mask, cache)
        token = logits.argmax(-1, keepdim=True)
        start = time.perf_counter()
        _, codes = run_and_get_code(step, token, position, full_mask, cache)
        seconds = time.perf_counter() - start
        if profile and backbone.device.type == "cuda":
            try:
                timings = profile_step(backbone, step, (token, position, full_mask, cache), ids, mask)
            except Exception as exc:  # the counts above still stand
                logger.exception("profiling the step failed")
                timings = {"profile_error": repr(exc)}
    return codes, seconds, timings


def profile_step(
    backbone: Backbone,
    step: Any,
    inputs: tuple[Any, ...],
    ids: torch.Tensor,
    mask: torch.Tensor,
    reps: int = 20,
) -> dict[str, Any]:
    """On a GPU: milliseconds of the compiled step replayed as a CUDA graph (what the recorded chunks run,
    without their token picking), of the eager prompt pass (``_prefill``) for the same rows, and the step's
    kernels as the profiler sees them when it runs from the host (count and GPU microseconds of each, the
    longest first)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = backbone.device

    def elapsed_ms(fn: Any, times: int) -> float:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        begin.record()
        for _ in range(times):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return begin.elapsed_time(end) / times

    for _ in range(3):
        step(*inputs)  # positions run past the prompt: still inside the cache for a few steps
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step(*inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    with torch.cuda.graph(graph):
        step(*inputs)
    step_ms = elapsed_ms(graph.replay, reps)
    cache = inputs[-1]

    def prefill() -> None:
        cache.reset()
        backbone._prefill(ids, mask, cache)

    prefill_ms = elapsed_ms(prefill, 3)
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step(*inputs)
        torch.cuda.synchronize(device)
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(event.name, []).append(event.device_time)
    count = sum(len(v) for v in kernels.values()) / reps
    busy = sum(sum(v) for v in kernels.values()) / reps
    top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))  # every kernel, the longest first
    return {
        "step_graph_ms": step_ms,
        "prefill_eager_ms": prefill_ms,
        "kernels_per_step": count,
        "kernel_us_per_step": busy,
        "top_kernels": [
            {"name": name[:160], "per_step": len(v) / reps, "us_per_step": sum(v) / reps} for name, v in top
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--layers", type=int, default=0, help="random model of this many layers (0: the model)"
    )
    parser.add_argument("--batch", default="1", help="comma-separated rows per step (a compile each)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="on a GPU: time the step as a CUDA graph, the prompt pass, kernels",
    )
    parser.add_argument("--length", type=int, default=136, help="static cache positions")
    parser.add_argument("--variants", default="unfused,fused")
    parser.add_argument("--inductor", action="append", default=[], help="an inductor option name=value")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = load_config(
        set_items=[
            f"model.name={args.model}",
            f"model.device={args.device}",
            f"model.dtype={args.dtype}",
            "generation.backend=compiled",
        ]
    )
    backbone = Backbone.load(config.model, config.generation)
    if args.layers:
        from transformers import AutoModelForCausalLM

        small = backbone.model.config.__class__.from_dict(
            {**backbone.model.config.to_dict(), "num_hidden_layers": args.layers}
        )
        model = AutoModelForCausalLM.from_config(small, dtype=backbone.dtype).to(backbone.device)
        backbone = Backbone(
            model,
            backbone.tokenizer,
            name=f"{backbone.name} ({args.layers} layers, random)",
            generation=backbone.generation,
        )
    options = {}
    for item in args.inductor:
        name, value = item.split("=", 1)
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    results: dict[str, Any] = {
        "model": backbone.name,
        "device": str(backbone.device),
        "dtype": str(backbone.dtype),
        "layers": backbone.num_layers,
        "batch": args.batch,
        "length": args.length,
        "inductor": options,
        "torch": torch.__version__,
        "variants": {},
    }
    from torch._dynamo.utils import counters

    batches = [int(b) for b in args.batch.split(",") if b]
    for batch in batches:
        for variant in filter(None, args.variants.split(",")):
            fused = "never" if variant == "unfused" else "always"
            attention = "sdpa" if variant in ("unfused", "fused") else "grouped"
            backbone.generation = dataclasses.replace(
                backbone.generation,
                fused_projections=fused,
                decode_attention=attention,
                reduced_rows=batch if variant in ("reduced", "unpaired") else 0,
                reduced_attention_rows=batch
                if variant in ("reduced", "reduced_attention", "unpaired")
                else 0,
                paired_cache=variant != "unpaired",
                attention_step_rows=0 if variant == "separate" else batch,
            )
            with torch._inductor.config.patch(options):
                codes, seconds, timings = step_code(backbone, batch, args.length, profile=args.profile)
            counted = count_launches(codes)
            counted["compile_seconds"] = seconds
            counted["inductor_counters"] = {
                k: v
                for k, v in counters["inductor"].items()
                if "fusion" in k or k.startswith(("batch_", "group_"))
            }
            counted.update(timings)
            results["variants"][f"{variant} x{batch}"] = counted
            logger.info(
                "%s, batch %d: %d launches per step %s (compiled in %.1fs) %s",
                variant,
                batch,
                counted["total"],
                counted["by_kind"],
                seconds,
                {k: v for k, v in timings.items() if k != "top_kernels"},
            )
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"step_{variant}_{batch}.py").write_text("\n\n# ----\n\n".join(codes))
    print(
        f"| variant x rows | launches per step | by kind | compile s | step ms (graph) | prompt ms (eager) |"
        f"  ({results['model']}, {results['layers']} layers, {results['device']})"
    )
    print("|---|---:|---|---:|---:|---:|")
    for variant, row in results["variants"].items():
        graph_ms, prefill_ms = row.get("step_graph_ms"), row.get("prefill_eager_ms")
        print(
            f"| {variant} | {row['total']} | {row['by_kind']} | {row['compile_seconds']:.1f} | "
            f"{'' if graph_ms is None else f'{graph_ms:.3f}'} | "
            f"{'' if prefill_ms is None else f'{prefill_ms:.1f}'} |"
        )
    if args.out:
        (args.out / "kernels.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
