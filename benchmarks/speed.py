"""Speed of answering and learning, each fast path side by side with the eager Hugging Face path (same run).

Sections (``--sections``, all by default):

- ``streams``: new tokens/s for 1, 64 and 256 prompts decoded together (``--streams``), every prompt forced to
  ``--new-tokens`` tokens, on ``eager`` and on the fast backend (``--backend``, default ``compiled``);
- ``strategies``: one-stream answer latency of each strategy after learning ``--strategy-docs`` documents,
  as a ratio to the base model's on the same path, and whether the fast path's answers equal the eager ones;
- ``learn1``: seconds to learn one ~200-token document with ``ttt`` (``--learn-specs``), with the default
  training steps and with the speed options (``--fast-optim``: packing, bf16 autocast on a GPU);
- ``learn_many``: document tokens/s learning ``--many`` documents at once (``learn_documents``) with the speed
  options, against learning them one at a time with the defaults (measured on ``--sequential`` of them);
- ``teacher``: the context-distillation teacher's signals for ``--teacher-docs`` documents (the examples of
  ``objective: context_distill``), one document at a time on ``eager`` (Hugging Face's generate, how teachers
  ran before) against all documents together on the fast backend (shared batches, the lean loop), and the
  share of continuations both give alike;
- ``tasks``: task training examples/s of ``learn_task`` at the default batch size and at ``--task-batch``;
  on a GPU the large batch trains compiled (``tasks.compile``, unless ``--task-eager``) and is also measured
  uncompiled (``large_batch_eager``), with both final losses;
- ``service``: ``--service-clients`` concurrent clients, each sending ``--service-requests`` greedy chat
  requests one after another with answer budgets cycling through ``--service-tokens``, through the service's
  generation thread (``Batcher``, strategy ``none``, ``max_batch`` ``--service-batch``) with continuous
  batching off (whole batches) and on (rows joined and left between decoding steps): new tokens/s, p50/p95
  request latency and their ratios, and whether both modes give the same answers (``--service-backend``).

Prompt and document texts come from the generated ``novel_facts`` benchmark (no data files needed).

    python benchmarks/speed.py --device cuda --out benchmarks/results/speed/h200            # the full run
    python benchmarks/speed.py --quick --threads 2 --out benchmarks/results/speed/cpu        # CPU, minutes

Writes ``results.json``, ``results.md`` and ``speed.png`` to ``--out`` (after every section).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from continual_transformer.backbone import Backbone
from continual_transformer.config import load_config
from continual_transformer.evaluation import system
from continual_transformer.evaluation.datasets import load_benchmark
from continual_transformer.evaluation.knowledge import spec_config
from continual_transformer.session import Session
from continual_transformer.strategies import registry

logger = logging.getLogger("speed")

SECTIONS = (
    "streams",
    "speculative",
    "prefix",
    "strategies",
    "learn1",
    "learn_many",
    "teacher",
    "tasks",
    "service",
    "int8",
)
TARGETS = {  # the H200 targets of the speed issue (bf16), for the report's "distance" column
    "stream_1_tokens_per_s": 1000.0,
    "stream_64_tokens_per_s": 50000.0,
    "strategy_latency_ratio_max": 1.15,
    "learn1_seconds": 1.0,
    "learn_many_doc_tokens_per_s": 50000.0,
    "task_examples_per_s": 2000.0,
}


def timed(fn: Callable[[], Any], device: torch.device, reps: int) -> tuple[float, Any]:
    """Median wall seconds of ``reps`` calls (the device synchronised around each) and the last result."""
    times, out = [], None
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


class GarbageCollections:
    """Wall seconds and count of Python's garbage collections per generation while inside (a phase that
    allocates many objects after a compile can pay a full collection of the compiler's objects)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._start
            self.count[info["generation"]] += 1

    def __enter__(self) -> GarbageCollections:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def figures(self) -> dict[str, Any]:
        return {"seconds": [round(x, 4) for x in self.seconds], "collections": self.count}


def use_backend(backbone: Backbone, backend: str, **changes: Any) -> None:
    backbone.generation = dataclasses.replace(backbone.generation, backend=backend, **changes)


# -- sections ------------------------------------------------------------------------------------------------


def streams(
    backbone: Backbone,
    args: argparse.Namespace,
    prompts: list[str],
    rows: dict[str, Any],
    save: Callable[[], None],
) -> dict[str, Any]:
    """Fills ``rows`` one figure at a time (``save()`` after each: an interrupted run keeps them). First the
    headline figures, stream count by stream count: eager (at ``--eager-streams``) and the fast backend as
    configured; then the comparisons on the fast backend, each a compile of its own: ``--unfused`` counts
    with ``generation.fused_projections=never`` (row ``<backend>_unfused``), ``--tuned`` counts with the
    ``--inductor`` options (row ``<backend>_tuned``), ``--untuned`` counts without the decoding step's
    kernel tuning (``generation.tuned_rows=0``, row ``<backend>_untuned``), ``--not-ahead`` counts with each
    recorded chunk read before the next is queued (``generation.ahead_rows=0``, row
    ``<backend>_not_ahead``), ``--ahead`` and ``--reduced`` counts with ``generation.ahead_rows`` or
    ``generation.reduced_rows`` set to the count (rows ``<backend>_ahead``, ``<backend>_reduced``),
    ``--reduced-attention`` with ``generation.reduced_attention_rows`` set to the count and
    ``--library-attention`` with it at 0 (rows ``<backend>_reduced_attention``,
    ``<backend>_library_attention``), ``--unpaired`` counts with keys and values cached in two tensors
    (``generation.paired_cache=false``, row ``<backend>_unpaired``), ``--efficient-attention`` counts
    with the memory-efficient attention kernel (``generation.decode_attention_kernel=efficient``, row
    ``<backend>_efficient_attention``), ``--triton-attention`` counts with the one Triton kernel
    (``generation.decode_attention_kernel=triton``, row ``<backend>_triton_attention``), ``--library-kernel``
    counts with PyTorch's choice of kernel (``decode_attention_kernel=library``, row
    ``<backend>_library_kernel``), ``--block-64`` counts with the Triton kernel's blocks of 64 positions
    (row ``<backend>_block_64``), ``--separate-step`` counts with Hugging Face's attention layers around the
    Triton kernel (``generation.attention_step_rows=0``, row ``<backend>_separate_step``),
    ``--uncompiled-prompt`` counts with the recorded prompt pass uncompiled (``generation.compiled_prompt=
    false``, row ``<backend>_uncompiled_prompt``), ``--grouped``
    counts with the
    grouped decoding attention (row ``<backend>_grouped``); then the recorded chunks against the same compiled
    step driven from the host. With ``--interleave`` the eager and the fast calls alternate rep by rep (a
    shared, loaded machine's drift then falls on both alike)."""
    fast = args.backend

    def batch_of(n: int) -> list[str]:
        return [prompts[i % len(prompts)] for i in range(n)]

    fused, attention = backbone.generation.fused_projections, backbone.generation.decode_attention
    configured_generation = backbone.generation

    def call(backend: str, n: int, **changes: Any) -> list[str]:
        # every call from the configured settings: a comparison row's change does not outlive its row
        backbone.generation = configured_generation
        configured = {"batch_size": n, "fused_projections": fused, "decode_attention": attention}
        use_backend(backbone, backend, **{**configured, **changes})
        return backbone.generate(
            batch_of(n), chat=True, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens
        )

    def record(n: int, key: str, times: list[float], warm_s: float, answers: list[str]) -> None:
        seconds = statistics.median(times)
        rows[str(n)][key] = {
            "seconds": seconds,
            "new_tokens_per_s": n * args.new_tokens / seconds,
            "reps_seconds": times,
            "warmup_seconds": warm_s,
            "answers": answers[:2],
        }
        logger.info(
            "%d streams, %s: %.1f new tokens/s (warm-up %.1fs)",
            n,
            key,
            rows[str(n)][key]["new_tokens_per_s"],
            warm_s,
        )
        save()

    def warm_up(fn: Callable[[], Any], calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - start

    def measure(n: int, key: str, fn: Callable[[], list[str]]) -> None:
        warm_s = warm_up(fn, 1 if key == "eager" else args.warmup)
        times, last = [], []
        for _ in range(args.reps):
            seconds, last = timed(fn, backbone.device, 1)
            times.append(seconds)
        record(n, key, times, warm_s, last)

    def prompt_uncaptured(n: int) -> list[str]:
        """The fast call with the prompt pass run uncaptured (the recorded chunks stay: no compile)."""
        backbone._prompt_graphs_failed = True
        for chunk in backbone._lean_graphs.values():
            chunk.prompts.clear()
        try:
            return call(fast, n)
        finally:
            backbone._prompt_graphs_failed = False

    for n in args.streams:
        row: dict[str, Any] = {"fused_projections": fused, "decode_attention": attention}
        rows[str(n)] = row
        backends = ("eager", fast) if n in args.eager_streams else (fast,)
        if args.interleave and len(backends) == 2:
            warm = {
                b: warm_up(lambda b=b, n=n: call(b, n), 1 if b == "eager" else args.warmup) for b in backends
            }
            times: dict[str, list[float]] = {b: [] for b in backends}
            answers: dict[str, list[str]] = {}
            for _ in range(args.reps):
                for b in backends:
                    seconds, answers[b] = timed(lambda b=b, n=n: call(b, n), backbone.device, 1)
                    times[b].append(seconds)
            for b in backends:
                record(n, b, times[b], warm[b], answers[b])
        else:
            for b in backends:
                measure(n, b, lambda b=b, n=n: call(b, n))
        try:  # diagnostics: a failure here must not cost the figures after it
            if args.profile:
                row["profile"] = profile_call(lambda n=n: call(fast, n), backbone.device, n * args.new_tokens)
                logger.info("%d streams, %s, one call profiled: %s", n, fast, row["profile"]["summary"])
                save()
            if backbone._lean_mode == "graphs" and backbone._lean_graphs and fast in row:
                row["answers_equal_prompt_uncaptured"] = prompt_uncaptured(n)[:2] == row[fast]["answers"]
                logger.info(
                    "%d streams: the recorded prompt pass answers as the uncaptured one: %s",
                    n,
                    row["answers_equal_prompt_uncaptured"],
                )
                save()
        except Exception:
            logger.exception("%d streams: profiling or the prompt-pass check failed", n)
        if "eager" in row:
            row["speedup"] = row[fast]["new_tokens_per_s"] / row["eager"]["new_tokens_per_s"]
            row["answers_equal"] = row[fast]["answers"] == row["eager"]["answers"]
            save()
    comparisons = [(n, "unfused", {"fused_projections": "never"}, {}) for n in args.unfused]
    comparisons += [(n, "tuned", {}, args.inductor) for n in args.tuned]
    comparisons += [(n, "untuned", {"tuned_rows": 0}, {}) for n in args.untuned]
    comparisons += [(n, "not_ahead", {"ahead_rows": 0}, {}) for n in args.not_ahead]
    comparisons += [(n, "ahead", {"ahead_rows": n}, {}) for n in args.ahead]
    comparisons += [(n, "reduced", {"reduced_rows": n}, {}) for n in args.reduced]
    comparisons += [
        (n, "reduced_attention", {"reduced_attention_rows": n}, {}) for n in args.reduced_attention
    ]
    comparisons += [
        (n, "library_attention", {"reduced_attention_rows": 0}, {}) for n in args.library_attention
    ]
    comparisons += [(n, "unpaired", {"paired_cache": False}, {}) for n in args.unpaired]
    comparisons += [
        (n, "efficient_attention", {"decode_attention_kernel": "efficient"}, {})
        for n in args.efficient_attention
    ]
    comparisons += [
        (n, "triton_attention", {"decode_attention_kernel": "triton"}, {}) for n in args.triton_attention
    ]
    comparisons += [
        (n, "library_kernel", {"decode_attention_kernel": "library"}, {}) for n in args.library_kernel
    ]
    comparisons += [(n, "block_64", {}, {}) for n in args.block_64]
    comparisons += [(n, "separate_step", {"attention_step_rows": 0}, {}) for n in args.separate_step]
    comparisons += [(n, "uncompiled_prompt", {"compiled_prompt": False}, {}) for n in args.uncompiled_prompt]
    comparisons += [(n, "grouped", {"decode_attention": "grouped"}, {}) for n in args.grouped]
    comparisons += [(n, "sdpa", {"decode_attention": "sdpa"}, {}) for n in args.sdpa]
    # last: the configured path once more, after every other row (is a row's difference the setting's, or
    # the order the rows ran in?)
    comparisons += [(n, "again", {}, {}) for n in args.again]
    for n, name, changes, options in comparisons:
        row = rows.get(str(n))
        if row is None or fast not in row:
            continue
        key = f"{fast}_{name}"
        backbone.lean_inductor_options = options
        try:
            with _attention_block(backbone, name == "block_64"):
                measure(n, key, lambda n=n, changes=changes: call(fast, n, **changes))
        finally:
            backbone.lean_inductor_options = {}
        configured, other = row[fast]["new_tokens_per_s"], row[key]["new_tokens_per_s"]
        # unfused, sdpa: how much faster the configured path is than without the fused projections / grouped
        # attention; tuned, grouped: the gain of the options / the grouped attention over the configured path
        speedup = (
            configured / other
            if name in ("unfused", "sdpa", "library_kernel", "block_64", "separate_step", "uncompiled_prompt")
            else other / configured
        )
        row[f"{name}_speedup"] = speedup
        row[f"answers_equal_{name}"] = row[key]["answers"] == row[fast]["answers"]
        logger.info(
            "%d streams: %s speedup %.3f, answers equal: %s", n, name, speedup, row[f"answers_equal_{name}"]
        )
        save()
    # The recorded chunks against the same compiled step run from the host, token by token (its cache is 8
    # positions shorter, masked either way; the step is traced again for it, so no time is taken): the
    # answers should agree.
    for n in args.host_check:
        if backbone._lean_mode != "graphs" or not backbone._lean_graphs or str(n) not in rows:
            continue
        backbone._lean_mode = "default"
        try:
            host = call(fast, n)
        finally:
            backbone._lean_mode = "graphs"
        rows[str(n)]["answers_equal_compiled_step_from_host"] = host[:2] == rows[str(n)][fast]["answers"]
        logger.info(
            "%d streams: recorded chunks equal the host-driven step: %s",
            n,
            host[:2] == rows[str(n)][fast]["answers"],
        )
        save()
    use_backend(backbone, "eager", batch_size=args.batch_size)
    return rows


@contextlib.contextmanager
def _attention_block(backbone: Backbone, small: bool) -> Any:
    """With ``small``, every launch of the Triton decoding attention reads blocks of
    ``triton_attention.BLOCK_POSITIONS`` cached positions (64), as before the block followed the number of
    programs: the compiled steps are traced again for it (their guards read the setting) and the recorded
    chunks are recorded again, on the way in and out."""
    if not small:
        yield
        return
    from continual_transformer.modules import triton_attention

    kept = triton_attention.FEW_PROGRAMS
    triton_attention.FEW_PROGRAMS = 0
    backbone._lean_graphs.clear()
    try:
        yield
    finally:
        triton_attention.FEW_PROGRAMS = kept
        backbone._lean_graphs.clear()


def profile_call(
    fn: Callable[[], Any], device: torch.device, tokens: int, unit: str = "new token"
) -> dict[str, Any]:
    """One call under the profiler (GPU kernels, those replayed from CUDA graphs included): kernels and GPU
    busy milliseconds per call and per ``unit`` (``tokens`` of them), the wall time, the kernels taking
    the most time, where the GPU waited (:func:`idle_gaps`) and, on a GPU, what the host did meanwhile
    (:func:`host_during_gaps`). On a CPU the same for ATen ops (nested ones counted too; a check of this
    function more than a figure)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1000
    occupants: Any = None
    launches: Any = None
    if cuda:
        try:  # a diagnostic: the figures above stand without it
            traced = traced_call(fn, device)
            occupants = host_during_gaps(traced, kind)
            launches = graph_launches(traced)
        except Exception as exc:
            occupants = launches = {"error": repr(exc)}
    kernels: dict[str, list[float]] = {}
    spans: list[tuple[float, float]] = []
    events = prof.events()
    first_host = min((e.time_range.start for e in events if e.device_type != kind), default=None)
    for event in events:
        if event.device_type == kind:
            time_us = event.device_time if cuda else event.cpu_time
            kernels.setdefault(event.name, []).append(time_us / 1000)  # ms
            spans.append((event.time_range.start, event.time_range.end))
    count = sum(len(v) for v in kernels.values())
    busy = sum(sum(v) for v in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:15]
    return {
        "summary": f"{count} kernels, {busy:.1f} ms GPU busy, {wall_ms:.1f} ms wall, "
        f"{count / max(tokens, 1):.1f} kernels and {busy / max(tokens, 1) * 1000:.1f} us per {unit}",
        "kernels": count,
        "gpu_busy_ms": busy,
        "wall_ms": wall_ms,
        "top_kernels": [{"name": k[:140], "launches": len(v), "ms": sum(v)} for k, v in top],
        "idle": idle_gaps(spans, first_host) if cuda else None,
        "host_during_gaps": occupants,
        "graph_launches": launches,
        "host": host_profile(fn, device),
    }


def traced_call(fn: Callable[[], Any], device: torch.device) -> Any:
    """One more call under the profiler with the host's operators and runtime calls recorded too (for
    :func:`host_during_gaps` and :func:`graph_launches`); returns the finished profile."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return prof


def host_during_gaps(
    prof: Any, kind: Any, at_least_us: float = 100.0, most: int = 12
) -> list[dict[str, Any]]:
    """For each of the ``most`` longest stretches of ``at_least_us`` or more where the GPU ran nothing in
    the profiled call ``prof`` (:func:`traced_call`), the host events that cover most of it, the innermost
    first (what the host was doing while the GPU waited for it: a graph launch, a copy, an operator). A
    stretch no event covers is Python between operators (the checks of a decoding call). The profiler's own
    work makes every stretch somewhat longer; the ranking is what to read."""
    events = prof.events()
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == kind)
    host = [e for e in events if e.device_type != kind]
    out = []
    stretches, _ = _idle_stretches(spans, at_least_us)
    for begin, end, index in sorted(stretches, key=lambda g: g[0] - g[1])[:most]:
        covering = []
        for event in host:
            overlap = min(end, event.time_range.end) - max(begin, event.time_range.start)
            if overlap > 0.2 * (end - begin):
                covering.append((event.time_range.end - event.time_range.start, overlap, event.name))
        covering.sort()  # the shortest (innermost) first
        out.append(
            {
                "us": round(end - begin, 1),
                "after_kernels": index,
                "host": [{"name": n[:120], "overlap_us": round(o, 1)} for _, o, n in covering[:8]],
            }
        )
    return sorted(out, key=lambda g: g["after_kernels"])


def graph_launches(prof: Any) -> dict[str, Any]:
    """Where a profiled call's GPU time goes, launch by launch (``prof`` from :func:`traced_call`): for each
    CUDA graph launched (the recorded prompt pass, then each recorded chunk of decoding steps), when the host
    launched it and when its kernels ran (milliseconds from the call's first host event), its kernel count,
    the span from its first kernel's start to its last kernel's end, and the time its kernels were busy; then
    the same for the kernels launched one by one (outside any graph). Kernels belong to the launch whose
    correlation id they carry (the profiler's trace)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        with open(path, encoding="utf-8") as handle:
            trace = json.load(handle)
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if "GraphLaunch" in e.get("name", "") and "correlation" in e.get("args", {})
    }
    origin = min(
        (e["ts"] for e in events if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset")), default=0
    )

    def group(members: list[dict[str, Any]]) -> dict[str, Any]:
        start = min(k["ts"] for k in members)
        end = max(k["ts"] + k.get("dur", 0) for k in members)
        return {
            "kernels": len(members),
            "gpu_from_ms": round((start - origin) / 1000, 3),
            "span_ms": round((end - start) / 1000, 3),
            "busy_ms": round(sum(k.get("dur", 0) for k in members) / 1000, 3),
        }

    by_launch: dict[Any, list[dict[str, Any]]] = {}
    loose = []
    for kernel in kernels:
        correlation = kernel.get("args", {}).get("correlation")
        (by_launch.setdefault(correlation, []) if correlation in launches else loose).append(kernel)
    rows = []
    for correlation, members in sorted(by_launch.items(), key=lambda kv: launches[kv[0]]["ts"]):
        rows.append({"host_at_ms": round((launches[correlation]["ts"] - origin) / 1000, 3), **group(members)})
    return {"graphs": rows, "outside_graphs": group(loose) if loose else None}


def _idle_stretches(
    spans: list[tuple[float, float]], at_least_us: float
) -> tuple[list[tuple[float, float, int]], float]:
    """The stretches of ``at_least_us`` or more in which no kernel of ``spans`` (sorted by start) ran, each
    as (begin, end, kernels before it), and the end of the last kernel."""
    stretches, reach = [], spans[0][1] if spans else 0.0
    for index, (start, end) in enumerate(spans[1:], 1):
        if start - reach >= at_least_us:
            stretches.append((reach, start, index))
        reach = max(reach, end)
    return stretches, reach


def idle_gaps(
    spans: list[tuple[float, float]], first_host: float | None, at_least_us: float = 20.0
) -> dict[str, Any]:
    """Where the GPU waited in a call (``spans``: each kernel's start and end, microseconds; ``first_host``:
    the call's first host event): the time before its first kernel, the idle time between kernels in gaps of
    ``at_least_us`` or more, their count, and the longest gaps with the kernels' count before each (the
    profiler's own host work makes them somewhat longer)."""
    spans = sorted(spans)
    stretches, reach = _idle_stretches(spans, at_least_us)
    gaps = [(end - begin, index) for begin, end, index in stretches]
    longest = sorted(gaps, reverse=True)[:16]
    return {
        "before_first_kernel_ms": (
            round((spans[0][0] - first_host) / 1000, 3) if spans and first_host is not None else None
        ),
        "first_to_last_kernel_ms": round((reach - spans[0][0]) / 1000, 3) if spans else 0.0,
        "idle_ms": round(sum(g for g, _ in gaps) / 1000, 3),
        "gaps": len(gaps),
        "longest": [{"us": round(g, 1), "after_kernels": i} for g, i in sorted(longest, key=lambda x: x[1])],
    }


def host_profile(fn: Callable[[], Any], device: torch.device, top: int = 25) -> dict[str, Any]:
    """One more call under Python's profiler: its wall milliseconds (without the profiler's and with it) and
    the functions with the most time of their own (a host read of device results shows as the time of the
    call that waits, e.g. ``item`` or ``tolist``). Where a call's wall goes beyond the GPU's busy time."""
    import cProfile
    import pstats

    def synced() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    plain_ms = timed(synced, device, 1)[0] * 1000
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(synced)
    profiled_ms = (time.perf_counter() - start) * 1000
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive, own s, cumulative s, ...)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return {
        "wall_ms": round(plain_ms, 3),
        "profiled_wall_ms": round(profiled_ms, 3),
        "functions": [
            {
                "function": f"{Path(file).name}:{line}:{name}",
                "calls": calls,
                "own_ms": round(own * 1000, 3),
                "cumulative_ms": round(cumulative * 1000, 3),
            }
            for (file, line, name), (_, calls, own, cumulative, _) in rows
        ],
    }


def _off_and_on(
    backbone: Backbone, args: argparse.Namespace, label: str, texts: list[str], setting: str, value: int
) -> dict[str, Any]:
    """``texts`` answered one after another on the fast backend (``--new-tokens`` each) with the generation
    ``setting`` at 0 ("off") and at ``value`` ("on"), after a warm-up call of each, the two alternating rep
    by rep (a loaded machine's drift falls on both alike): per setting seconds, new tokens/s and the first
    answers; the speedup, and the share of answers "on" equal to "off"'s."""
    fast, configured = args.backend, backbone.generation
    settings = {"off": 0, "on": value}

    def call(v: int) -> list[str]:
        use_backend(backbone, fast, batch_size=1, **{setting: v})
        return [
            backbone.generate([t], chat=True, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)[
                0
            ]
            for t in texts
        ]

    row: dict[str, Any] = {"prompts": len(texts)}
    warm = {}
    for key, v in settings.items():  # compiles and records the graphs of each setting
        start = time.perf_counter()
        call(v)
        warm[key] = time.perf_counter() - start
    times: dict[str, list[float]] = {key: [] for key in settings}
    answers: dict[str, list[str]] = {}
    for _ in range(args.reps):
        for key, v in settings.items():
            seconds, answers[key] = timed(lambda v=v: call(v), backbone.device, 1)
            times[key].append(seconds)
    backbone.generation = configured
    for key in settings:
        seconds = statistics.median(times[key])
        row[key] = {
            "seconds": seconds,
            "new_tokens_per_s": len(texts) * args.new_tokens / seconds,
            "reps_seconds": times[key],
            "warmup_seconds": warm[key],
            "answers": answers[key][:2],
        }
    row["speedup"] = row["on"]["new_tokens_per_s"] / row["off"]["new_tokens_per_s"]
    row["answers_equal"] = sum(a == b for a, b in zip(answers["on"], answers["off"])) / len(texts)
    logger.info(
        "%s: %.1f -> %.1f new tokens/s (%.2fx), answers equal %.2f",
        label,
        row["off"]["new_tokens_per_s"],
        row["on"]["new_tokens_per_s"],
        row["speedup"],
        row["answers_equal"],
    )
    return row


def speculative(
    backbone: Backbone,
    args: argparse.Namespace,
    prompt_sets: dict[str, list[str]],
    rows: dict[str, Any],
    save: Callable[[], None],
) -> dict[str, Any]:
    """One stream on the fast backend, prompt-lookup decoding off and on (``generation.speculative_tokens``
    0 and ``--speculative-drafts``), for each prompt set (closed-book questions; a document and a question
    about it): ``--speculative-prompts`` prompts per timed call (:func:`_off_and_on`), and the new tokens
    per decoding step with drafts."""
    for name, texts in prompt_sets.items():
        chosen = [texts[i % len(texts)] for i in range(args.speculative_prompts)]
        backbone.speculation = {"steps": 0, "tokens": 0}
        row = rows[name] = _off_and_on(
            backbone, args, f"speculative, {name}", chosen, "speculative_tokens", args.speculative_drafts
        )
        row["drafts"] = args.speculative_drafts
        row["on"]["new_tokens_per_step"] = backbone.speculation["tokens"] / max(
            backbone.speculation["steps"], 1
        )
        logger.info("speculative, %s: %.2f new tokens per step", name, row["on"]["new_tokens_per_step"])
        save()
    return rows


def prefix(
    backbone: Backbone,
    args: argparse.Namespace,
    prompt_sets: dict[str, list[str]],
    rows: dict[str, Any],
    save: Callable[[], None],
) -> dict[str, Any]:
    """One stream on the fast backend, several questions about each document asked one after another, with
    prompt-prefix reuse off and on (``generation.prefix_reuse_tokens`` 0 and the configured value, 32 when
    off; :func:`_off_and_on`), and the share of prompt tokens not run again."""
    tokens = backbone.generation.prefix_reuse_tokens or 32
    for name, texts in prompt_sets.items():
        backbone.prefix_reused = {"calls": 0, "tokens": 0}
        row = rows[name] = _off_and_on(
            backbone, args, f"prefix reuse, {name}", texts, "prefix_reuse_tokens", tokens
        )
        prompt_tokens = sum(len(backbone.token_ids(backbone.format_prompt(t, chat=True))) for t in texts)
        calls = 1 + args.reps  # the warm-up and the timed calls with reuse on
        row["on"]["reused_prompt_share"] = backbone.prefix_reused["tokens"] / (calls * prompt_tokens)
        logger.info("prefix reuse, %s: %.2f of prompt tokens reused", name, row["on"]["reused_prompt_share"])
        save()
    return rows


def questions_per_document(name: str, documents: int, questions: int) -> list[str]:
    """``questions`` prompts about each of ``documents`` documents of the knowledge benchmark ``name`` (its
    text, then a probe: a question, or a cloze sentence to complete), grouped by document."""
    bench = load_benchmark(name, n_docs=4 * documents, seed=0)
    by_doc: dict[str, list[Any]] = {}
    for probe in bench.probes:
        by_doc.setdefault(probe.doc_id, []).append(probe)
    out = []
    for doc in bench.documents:
        probes = by_doc.get(doc.id, [])
        if len(probes) < questions:
            continue
        for probe in probes[:questions]:
            ask = "Complete this sentence from the text above:" if probe.kind == "cloze" else "Answer:"
            out.append(f"{doc.text}\n\n{ask} {probe.prompt}")
        if len(out) >= documents * questions:
            break
    return out


def document_prompts(backbone: Backbone, name: str, count: int) -> list[str]:
    """``count`` prompts of a document and a question about it, from the knowledge benchmark ``name``: the
    document's text, then its first probe (a cloze sentence is to be completed). Drawn from four times as
    many documents, those whose prompts fall in the most common bucket of ``PROMPT_BUCKET`` tokens: on the
    compiled backend every bucket is a compile of its own."""
    from continual_transformer.backbone import PROMPT_BUCKET

    bench = load_benchmark(name, n_docs=4 * count, seed=0)
    first = {}
    for probe in bench.probes:
        first.setdefault(probe.doc_id, probe)
    prompts = []
    for doc in bench.documents:
        probe = first.get(doc.id)
        if probe is not None:
            ask = "Complete this sentence from the text above:" if probe.kind == "cloze" else "Answer:"
            prompts.append(f"{doc.text}\n\n{ask} {probe.prompt}")
    buckets: dict[int, list[str]] = {}
    for text in prompts:
        size = len(backbone.token_ids(backbone.format_prompt(text, chat=True)))
        buckets.setdefault(-(-size // PROMPT_BUCKET), []).append(text)
    return max(buckets.values(), key=len)[:count] if buckets else []


def int8(
    backbone: Backbone,
    args: argparse.Namespace,
    config,
    prompts: list[str],
    row: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """One stream on the CPU: the float32 model on the eager path against copies quantized each way
    (``model.quantize``: ``--quantize-kinds``) on the fast backend, call by call over a few prompts,
    alternating (a loaded machine's drift falls on all alike); the share of answers equal to float32's."""
    if backbone.device.type != "cpu":
        return
    kinds = list(args.quantize_kinds)
    models = {
        kind: Backbone.load(dataclasses.replace(config.model, quantize=kind), config.generation)
        for kind in kinds
    }
    chosen = prompts[: args.int8_prompts]

    def call(which: Backbone, backend: str, prompt: str) -> list[str]:
        use_backend(which, backend, batch_size=1)
        return which.generate(
            [prompt], chat=True, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens
        )

    runs = [("float32", backbone, "eager"), *((kind, models[kind], args.backend) for kind in kinds)]
    for prompt in chosen[:1]:  # warm-up (the fast backend's caches)
        for _, which, backend in runs:
            call(which, backend, prompt)
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    answers: dict[str, list[str]] = {name: [] for name, _, _ in runs}
    for rep in range(args.reps):
        for prompt in chosen:
            for name, which, backend in runs:
                seconds, out = timed(lambda w=which, b=backend, p=prompt: call(w, b, p), backbone.device, 1)
                times[name].append(seconds)
                if rep == 0:
                    answers[name] += out
    for name in times:
        row[name] = {
            "new_tokens_per_s": args.new_tokens / statistics.median(times[name]),
            "seconds": times[name],
            "answers": answers[name],
        }
    for kind in kinds:
        row[kind]["speedup"] = row[kind]["new_tokens_per_s"] / row["float32"]["new_tokens_per_s"]
        row[kind]["answers_equal"] = sum(a == b for a, b in zip(answers["float32"], answers[kind])) / len(
            chosen
        )
    row["kinds"] = kinds
    row["prompts"] = len(chosen)
    use_backend(backbone, "eager", batch_size=args.batch_size)
    save()


def strategies(
    backbone: Backbone,
    args: argparse.Namespace,
    config,
    bench,
    rows: dict[str, Any],
    save: Callable[[], None],
) -> dict[str, Any]:
    """Fills ``rows`` one strategy at a time (``save()`` after each: an interrupted run keeps them)."""
    probes = [p.prompt for p in bench.probes if p.kind == "qa"][: args.probes]
    docs = bench.documents[: args.strategy_docs]
    # every answer as long as the others (an answer that ends early would make its strategy look fast)
    lengths = {} if args.free_lengths else {"min_new_tokens": args.new_tokens}
    for backend in ("eager", args.backend):  # first-call costs stay out of the base row
        use_backend(backbone, backend, batch_size=1)
        for p in probes:
            backbone.generate([p], chat=True, max_new_tokens=args.new_tokens)
    for spec in ["none", *[s for s in args.strategies if s != "none"]]:
        name, section = spec_config(config, spec)
        try:
            strategy = registry.get(name)(backbone, section, settings=config)
        except Exception as exc:  # e.g. a sentence embedder not on this machine: the other rows still run
            logger.warning("%s: not measured (%s)", spec, exc)
            continue
        try:
            start = time.perf_counter()
            if name != "none":
                strategy.learn_documents(docs) if args.batched_learning else [strategy.learn(d) for d in docs]
            learn_s = time.perf_counter() - start
            row: dict[str, Any] = {"learn_seconds": learn_s}
            for backend in ("eager", args.backend):
                use_backend(backbone, backend, batch_size=1)
                warm = time.perf_counter()
                for _ in range(args.warmup):
                    strategy.generate(probes[:1], chat=True, max_new_tokens=args.new_tokens, **lengths)
                warm_s = time.perf_counter() - warm
                times, answers = [], []
                for p in probes:
                    seconds, out = timed(
                        lambda p=p, s=strategy: s.generate(
                            [p], chat=True, max_new_tokens=args.new_tokens, **lengths
                        ),
                        backbone.device,
                        1,
                    )
                    times.append(seconds)
                    answers.append(out[0])
                row[backend] = {
                    "latency_s": statistics.median(times),
                    "warmup_seconds": warm_s,
                    "answers": answers,
                }
            row["answers_equal"] = row[args.backend]["answers"] == row["eager"]["answers"]
            row["answers_equal_fraction"] = sum(
                a == b for a, b in zip(row[args.backend]["answers"], row["eager"]["answers"])
            ) / max(len(probes), 1)
            rows[spec] = row
            for backend in ("eager", args.backend):
                base = rows["none"][backend]["latency_s"]
                row[backend]["ratio_to_base"] = row[backend]["latency_s"] / base
            logger.info(
                "%s: learned in %.1fs; latency %.3fs eager, %.3fs %s (x%.2f of base; warm-up %.1fs); "
                "answers equal: %s",
                spec,
                learn_s,
                row["eager"]["latency_s"],
                row[args.backend]["latency_s"],
                args.backend,
                row[args.backend]["ratio_to_base"],
                row[args.backend]["warmup_seconds"],
                row["answers_equal"],
            )
            save()
        finally:
            strategy.close()
            use_backend(backbone, "eager", batch_size=args.batch_size)
    return rows


def _optim_changes(spec: str, optim: dict[str, Any]) -> str:
    """``spec`` with the speed options of ``optim`` added as flat strategy keys."""
    extra = ":".join(f"{k}={v}" for k, v in optim.items())
    return f"{spec}:{extra}" if extra else spec


def learn1(
    backbone: Backbone,
    args: argparse.Namespace,
    config,
    bench,
    rows: dict[str, Any],
    save: Callable[[], None],
) -> dict[str, Any]:
    """Fills ``rows`` one figure at a time (``save()`` after each): the document closest to 200 tokens (the
    target's size) of ``--learn1-benchmark`` (default: the run's novel-facts documents, about 90 tokens each;
    ``news``: BBC News articles) learned alone, after another one learned to warm up."""
    if args.learn1_benchmark != "novel_facts":
        bench = load_benchmark(args.learn1_benchmark, n_docs=64, seed=0)
    docs = sorted(bench.documents, key=lambda d: abs(len(backbone.token_ids(d.text)) - 200))
    warm, doc = docs[1], docs[0]
    for spec in args.learn_specs:
        row: dict[str, Any] = {"doc_tokens": len(backbone.token_ids(doc.text))}
        rows[spec] = row
        for label, optim in (("default", {}), ("fast", args.fast_optim)):
            name, section = spec_config(config, _optim_changes(spec, optim))
            strategy = registry.get(name)(backbone, section, settings=config)
            try:
                first_s, _ = timed(lambda s=strategy: s.learn(warm), backbone.device, 1)  # kernels, compiling
                strategy.reset()
                seconds, report = timed(lambda s=strategy: s.learn(doc), backbone.device, 1)
                row[label] = {
                    "seconds": seconds,
                    "first_call_seconds": first_s,
                    "steps": report.extra.get("steps"),
                    "loss_before": report.loss_before,
                    "loss_after": report.loss_after,
                    "phase_seconds": report.extra.get("phase_seconds"),
                    "optim": optim,
                }
            finally:
                strategy.close()
            logger.info(
                "learn one doc, %s %s: %.2fs (%s; first call %.1fs)",
                spec,
                label,
                row[label]["seconds"],
                row[label]["phase_seconds"],
                row[label]["first_call_seconds"],
            )
            save()
            if args.profile and label == "fast":
                strategy = registry.get(name)(backbone, section, settings=config)
                try:
                    strategy.learn(warm)
                    strategy.reset()
                    row["profile"] = profile_call(
                        lambda s=strategy: s.learn(doc), backbone.device, 1, "document"
                    )
                finally:
                    strategy.close()
                logger.info(
                    "learn one doc, %s fast, profiled (per document): %s", spec, row["profile"]["summary"]
                )
                save()
        row["speedup"] = row["default"]["seconds"] / row["fast"]["seconds"]
        save()
    return rows


def learn_many(
    backbone: Backbone,
    args: argparse.Namespace,
    config,
    bench,
    row: dict[str, Any],
    save: Callable[[], None],
) -> dict[str, Any]:
    """Fills ``row``: the sequential baseline (default options, default epochs and stop rule, on
    ``--sequential`` documents), then ``--many`` documents at once with the speed options and a bounded number
    of epochs (``--many-epochs``), ``save()`` after each."""
    docs = bench.documents[: args.many]
    tokens = [len(backbone.token_ids(d.text)) for d in docs]
    spec = args.learn_specs[0]
    row.update({"spec": spec, "documents": len(docs), "doc_tokens": sum(tokens)})
    name, section = spec_config(config, spec)
    strategy = registry.get(name)(backbone, section, settings=config)
    try:
        strategy.learn(docs[0])  # warm-up
        strategy.reset()
        n = min(args.sequential, len(docs))
        seconds, _ = timed(lambda: [strategy.learn(d) for d in docs[:n]], backbone.device, 1)
        row["sequential"] = {
            "documents": n,
            "seconds": seconds,
            "doc_tokens_per_s": sum(tokens[:n]) / seconds,
        }
        logger.info(
            "learn %d docs one at a time: %.0f doc tokens/s", n, row["sequential"]["doc_tokens_per_s"]
        )
        save()
    finally:
        strategy.close()
    optim = {**args.fast_optim, **({"epochs": args.many_epochs} if args.many_epochs else {})}
    name, section = spec_config(config, _optim_changes(spec, optim))
    strategy = registry.get(name)(backbone, section, settings=config)
    try:
        # warm-up (kernels; with optim.compile, the graphs: enough documents for a full batch of packed rows)
        first_s, _ = timed(
            lambda: strategy.learn_documents(docs[: max(2, len(docs) // 5)]), backbone.device, 1
        )
        strategy.reset()
        if args.gc_freeze:
            gc.collect()
            gc.freeze()
        with GarbageCollections() as collections:
            seconds, reports = timed(lambda: strategy.learn_documents(docs), backbone.device, 1)
        if args.profile:  # the warm-up's documents again, under the profiler (figures per document)
            strategy.reset()
            some = docs[: max(2, len(docs) // 5)]
            row["profile"] = profile_call(
                lambda: strategy.learn_documents(some), backbone.device, len(some), "document"
            )
            logger.info("learn %d docs, profiled (per document): %s", len(some), row["profile"]["summary"])
            # the scoring of every document (each learn_documents call's loss before and after) alone
            scoring = strategy._scoring(docs)
            row["profile_scoring"] = profile_call(
                lambda: strategy._document_nll(docs, *scoring), backbone.device, sum(tokens), "document token"
            )
            logger.info("score %d docs, profiled: %s", len(docs), row["profile_scoring"]["summary"])
        before = statistics.fmean(r.loss_before for r in reports)
        after = statistics.fmean(r.loss_after for r in reports)
        row["batched"] = {
            "seconds": seconds,
            "doc_tokens_per_s": sum(tokens) / seconds,
            "steps": reports[0].extra.get("steps"),
            "mean_loss_before": before,
            "mean_loss_after": after,
            "phase_seconds": reports[0].extra.get("phase_seconds"),
            "garbage_collections": collections.figures(),  # per generation 0, 1, 2
            "gc_frozen": args.gc_freeze,
            "warmup_documents": max(2, len(docs) // 5),
            "warmup_seconds": first_s,
            "optim": optim,
            "epochs": section.optim.epochs,
        }
    finally:
        strategy.close()
    row["speedup"] = row["batched"]["doc_tokens_per_s"] / row["sequential"]["doc_tokens_per_s"]
    logger.info(
        "learn %d docs: %.0f doc tokens/s batched, %.0f one at a time",
        len(docs),
        row["batched"]["doc_tokens_per_s"],
        row["sequential"]["doc_tokens_per_s"],
    )
    save()
    return row


def teacher(
    backbone: Backbone,
    args: argparse.Namespace,
    config,
    bench,
    row: dict[str, Any],
    save: Callable[[], None],
) -> dict[str, Any]:
    """Fills ``row``: the teacher signals of ``--teacher-docs`` documents one at a time on ``eager`` and all
    together on the fast backend (``distill`` settings of ``strategies.ttt``), each timed after a warm-up."""
    from continual_transformer import distillation

    texts = [d.text for d in bench.documents[: args.teacher_docs]]
    distill = spec_config(config, "ttt")[1].distill
    row.update({"documents": len(texts), "teacher_batch_size": distill.teacher_batch_size})
    configured = backbone.generation
    try:
        use_backend(backbone, "eager")
        distillation.documents_distill_examples(backbone, texts[:1], distill)  # warm-up
        seconds, alone = timed(
            lambda: [distillation.document_distill_examples(backbone, t, distill) for t in texts],
            backbone.device,
            1,
        )
        row["eager_one_at_a_time"] = {"seconds": seconds, "documents_per_s": len(texts) / seconds}
        save()
        use_backend(backbone, args.backend)
        first, _ = timed(
            lambda: distillation.documents_distill_examples(backbone, texts, distill), backbone.device, 1
        )
        seconds, together = timed(
            lambda: distillation.documents_distill_examples(backbone, texts, distill), backbone.device, 1
        )
    finally:
        backbone.generation = configured
    pairs = [(a.continuation, b.continuation) for x, y in zip(alone, together) for a, b in zip(x, y)]
    row[args.backend] = {
        "seconds": seconds,
        "documents_per_s": len(texts) / seconds,
        "warmup_seconds": first,
        "examples": sum(len(x) for x in together),
        "scored_tokens": sum(e.scored_tokens for x in together for e in x),
    }
    row["speedup"] = row["eager_one_at_a_time"]["seconds"] / seconds
    row["continuations_equal"] = sum(a == b for a, b in pairs) / max(1, len(pairs))
    logger.info(
        "teacher signals of %d documents: %.1f s one at a time on eager, %.1f s together on %s (%.2fx)",
        len(texts),
        row["eager_one_at_a_time"]["seconds"],
        seconds,
        args.backend,
        row["speedup"],
    )
    save()
    return row


def tasks(
    backbone: Backbone, args: argparse.Namespace, config, out: dict[str, Any], save: Callable[[], None]
) -> dict[str, Any]:
    """Fills ``out`` (``save()`` after each batch size)."""
    labels = ["weather", "music", "travel", "banking", "cooking", "sports", "health", "shopping"]
    rows = [
        {"text": f"request {i}: something about {labels[i % len(labels)]} for example {i * 7 % 13}",
         "label": labels[i % len(labels)]}
        for i in range(args.task_examples)
    ]  # fmt: skip
    out.update({"examples": len(rows), "epochs": 1})
    compiled = backbone.device.type == "cuda" and not args.task_eager
    runs = [("default", config.tasks.batch_size, False)]
    runs += [("large_batch_eager", args.task_batch, False)] if compiled else []
    runs += [("large_batch", args.task_batch, compiled)]
    for label, batch, compile_steps in runs:
        # the backbone router: the sentence embedder need not be on the machine (training is what is timed)
        tasks_config = dataclasses.replace(
            config.tasks, batch_size=batch, router="backbone", compile=compile_steps
        )
        session = Session(dataclasses.replace(config, strategy="none", tasks=tasks_config), backbone=backbone)
        try:
            first = time.perf_counter()
            session.learn_task("warmup", rows[:32], epochs=1)
            first_s = time.perf_counter() - first
            seconds, report = timed(
                lambda s=session: s.learn_task("speed", rows, epochs=1), backbone.device, 1
            )
            if args.profile and label == "large_batch":  # per example
                out["profile"] = profile_call(
                    lambda s=session, b=batch: s.learn_task("profiled", rows[: 2 * b], epochs=1),
                    backbone.device,
                    2 * batch,
                    "example",
                )
                logger.info(
                    "task training, batch %d, profiled (per example): %s", batch, out["profile"]["summary"]
                )
        finally:
            session.strategy.close()
        out[label] = {
            "batch_size": batch,
            "seconds": seconds,
            "examples_per_s": len(rows) / seconds,
            "train_seconds": report.train_seconds,
            "train_examples_per_s": len(rows) / report.train_seconds,
            "phase_seconds": report.extra.get("phase_seconds"),
            "final_loss": report.final_loss,
            "share_prefix": tasks_config.share_prefix,
            "compile": compile_steps,
            "warmup_task_seconds": first_s,
        }
        logger.info(
            "task training, batch %d%s: %.1f examples/s (%.1f loop alone; warm-up task %.1fs)",
            batch,
            ", compiled" if compile_steps else "",
            len(rows) / seconds,
            len(rows) / report.train_seconds,
            first_s,
        )
        save()
    out["speedup"] = out["large_batch"]["examples_per_s"] / out["default"]["examples_per_s"]
    return out


def service(
    backbone: Backbone,
    args: argparse.Namespace,
    config,
    prompts: list[str],
    out: dict[str, Any],
    save: Callable[[], None],
) -> dict[str, Any]:
    """Fills ``out`` (``save()`` after each mode): the same closed-loop clients through the service's
    generation thread with continuous batching off, then on."""
    import threading
    from collections import Counter

    from continual_transformer.service.batcher import Batcher
    from continual_transformer.service.rwlock import ReadWriteLock
    from continual_transformer.service.settings import ServiceConfig

    use_backend(backbone, args.service_backend)
    session = Session(dataclasses.replace(config, strategy="none"), backbone=backbone)
    n_clients, n_requests, budgets = args.service_clients, args.service_requests, args.service_tokens
    plan = [
        [
            (prompts[(c * n_requests + j) % len(prompts)], budgets[(c + j) % len(budgets)])
            for j in range(n_requests)
        ]
        for c in range(n_clients)
    ]
    out.update(
        {
            "clients": n_clients,
            "requests_per_client": n_requests,
            "budgets": budgets,
            "max_batch": args.service_batch,
            "continuous_length": args.service_length,
            "backend": args.service_backend,
        }
    )
    texts: dict[str, list[str]] = {}
    for mode in ("batch", "continuous"):
        settings = ServiceConfig(
            continuous=mode == "continuous",
            max_batch=args.service_batch,
            continuous_length=args.service_length,
            generation_timeout=3600.0,
            max_new_tokens=max(budgets),
        )
        batcher = Batcher(settings, lambda: session, ReadWriteLock(), Counter())
        thread = threading.Thread(target=batcher.run, daemon=True)
        thread.start()
        results: list[list[tuple[float, int, int, str]]] = [[] for _ in range(n_clients)]

        def client(c: int, batcher=batcher, results=results) -> None:
            for prompt, budget in plan[c]:
                start = time.perf_counter()
                answer = batcher.submit(prompt, chat=True, max_new_tokens=budget).result()
                results[c].append(
                    (time.perf_counter() - start, budget, answer.completion_tokens, answer.text)
                )

        try:
            warm_start = time.perf_counter()
            batcher.submit(plan[0][0][0], chat=True, max_new_tokens=4).result()
            warm_s = time.perf_counter() - warm_start
            start = time.perf_counter()
            clients = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
            for t in clients:
                t.start()
            for t in clients:
                t.join()
            wall = time.perf_counter() - start
        finally:
            batcher.stop(5)
            thread.join(60)
        done = [r for rows in results for r in rows]
        latencies = sorted(r[0] for r in done)
        tokens = sum(r[2] for r in done)
        by_budget = {
            str(b): statistics.median([r[0] for r in done if r[1] == b])
            for b in budgets
            if b in {r[1] for r in done}
        }
        texts[mode] = [r[3] for rows in results for r in rows]
        out[mode] = {
            "seconds": wall,
            "requests": len(done),
            "new_tokens": tokens,
            "new_tokens_per_s": tokens / wall,
            "latency_p50_s": _percentile(latencies, 50),
            "latency_p95_s": _percentile(latencies, 95),
            "latency_mean_s": statistics.fmean(latencies),
            "latency_p50_by_budget_s": by_budget,
            "warmup_seconds": warm_s,
        }
        logger.info(
            "service, continuous batching %s: %.1f new tokens/s, p50 %.2fs, p95 %.2fs",
            "on" if mode == "continuous" else "off",
            tokens / wall,
            out[mode]["latency_p50_s"],
            out[mode]["latency_p95_s"],
        )
        save()
    off, on = out["batch"], out["continuous"]
    out["speedup"] = on["new_tokens_per_s"] / off["new_tokens_per_s"]
    out["p50_ratio"] = off["latency_p50_s"] / on["latency_p50_s"]
    out["p95_ratio"] = off["latency_p95_s"] / on["latency_p95_s"]
    out["answers_equal_fraction"] = statistics.fmean(
        a == b for a, b in zip(texts["batch"], texts["continuous"])
    )
    return out


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


# -- report --------------------------------------------------------------------------------------------------


def _get(row: dict[str, Any], *keys: str) -> Any:
    """``row[k1][k2]...`` or None where a figure was not measured (a section cut off part-way)."""
    for key in keys:
        if not isinstance(row, dict) or key not in row:
            return None
        row = row[key]
    return row


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline figures and their distance to the targets (measured / target); figures not measured
    (a section cut off part-way) are left out."""
    s: dict[str, Any] = {}
    backend = results["meta"]["settings"]["backend"]
    figures = {}
    for n, row in results.get("streams", {}).items():
        figures[f"stream_{n}_tokens_per_s"] = _get(row, backend, "new_tokens_per_s")
        figures[f"stream_{n}_eager_tokens_per_s"] = _get(row, "eager", "new_tokens_per_s")
        figures[f"stream_{n}_speedup"] = row.get("speedup")
        for name in ("unfused", "tuned", "grouped", "sdpa"):
            figures[f"stream_{n}_{name}_tokens_per_s"] = _get(row, f"{backend}_{name}", "new_tokens_per_s")
            figures[f"stream_{n}_{name}_speedup"] = row.get(f"{name}_speedup")
    for name, row in results.get("speculative", {}).items():
        figures[f"speculative_{name}_tokens_per_s"] = _get(row, "on", "new_tokens_per_s")
        figures[f"speculative_{name}_off_tokens_per_s"] = _get(row, "off", "new_tokens_per_s")
        figures[f"speculative_{name}_speedup"] = row.get("speedup")
        figures[f"speculative_{name}_tokens_per_step"] = _get(row, "on", "new_tokens_per_step")
    for name, row in results.get("prefix", {}).items():
        figures[f"prefix_{name}_tokens_per_s"] = _get(row, "on", "new_tokens_per_s")
        figures[f"prefix_{name}_off_tokens_per_s"] = _get(row, "off", "new_tokens_per_s")
        figures[f"prefix_{name}_speedup"] = row.get("speedup")
    ratios = [_get(r, backend, "ratio_to_base") for r in results.get("strategies", {}).values()]
    ratios = [r for r in ratios if r is not None]
    if ratios:
        figures["strategy_latency_ratio_max"] = max(ratios)
    for spec, row in results.get("learn1", {}).items():
        if "learn1_seconds" not in figures:
            figures["learn1_seconds"] = _get(row, "fast", "seconds")
        figures[f"learn1_{spec}_seconds"] = _get(row, "fast", "seconds")
        figures[f"learn1_{spec}_default_seconds"] = _get(row, "default", "seconds")
    many = results.get("learn_many", {})
    figures["learn_many_doc_tokens_per_s"] = _get(many, "batched", "doc_tokens_per_s")
    figures["learn_many_epochs"] = _get(many, "batched", "epochs")
    figures["learn_many_sequential_doc_tokens_per_s"] = _get(many, "sequential", "doc_tokens_per_s")
    taught = results.get("teacher", {})
    figures["teacher_documents_per_s"] = _get(taught, backend, "documents_per_s")
    figures["teacher_speedup"] = taught.get("speedup")
    figures["task_examples_per_s"] = _get(results.get("tasks", {}), "large_batch", "examples_per_s")
    figures["task_default_examples_per_s"] = _get(results.get("tasks", {}), "default", "examples_per_s")
    served = results.get("service", {})
    figures["service_batch_tokens_per_s"] = _get(served, "batch", "new_tokens_per_s")
    figures["service_continuous_tokens_per_s"] = _get(served, "continuous", "new_tokens_per_s")
    figures["service_speedup"] = served.get("speedup")
    figures["service_p50_ratio"] = served.get("p50_ratio")
    figures["service_p95_ratio"] = served.get("p95_ratio")
    s.update({k: v for k, v in figures.items() if v is not None})
    return s


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["summary"] = summary(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    meta, s = results["meta"], results["meta"]["settings"]
    backend = s["backend"]
    lines = [
        "# Speed: fast paths against the eager Hugging Face path",
        "",
        f"Model `{meta['model']}` on {meta['device']} ({s['dtype']}, {s['threads']} CPU threads), fast "
        f"backend `{backend}`, {s['new_tokens']} new tokens per answer, library {meta['version']}, torch "
        f"{s['torch']}, transformers {s['transformers']}, {meta['date']}. Command: `{s['command']}`",
        "",
        "| figure | eager / default | fast | ratio | target (H200) | measured / target |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def line(
        figure: str, slow: float | None, fast: float | None, target_key: str | None, higher: bool = True
    ) -> None:
        if slow is None and fast is None:
            return
        ratio = (fast / slow if higher else slow / fast) if slow and fast else None
        target = TARGETS.get(target_key or "")
        distance = f"{fast / target:.3f}" if target and fast is not None else ""
        lines.append(
            f"| {figure} | {'' if slow is None else f'{slow:,.2f}'} | "
            f"{'(not measured)' if fast is None else f'{fast:,.2f}'} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} | "
            f"{'' if target is None else f'{target:,}'} | {distance} |"
        )

    for n, row in results.get("streams", {}).items():
        line(
            f"{n} stream(s), new tokens/s",
            _get(row, "eager", "new_tokens_per_s"),
            _get(row, backend, "new_tokens_per_s"),
            f"stream_{n}_tokens_per_s",
        )
    options = s.get("inductor_options") or {}
    for n, row in results.get("streams", {}).items():  # comparisons: the slow column is the reference
        configured = _get(row, backend, "new_tokens_per_s")
        # (row, label, whether the compared setting is the candidate: then it is the fast column)
        comparisons = (
            ("unfused", f"fused_projections={row.get('fused_projections')} vs never", False),
            ("tuned", f"inductor {options} vs as configured", True),
            ("untuned", "as configured vs tuned_rows=0", False),
            ("not_ahead", "as configured vs ahead_rows=0", False),
            ("ahead", f"ahead_rows={n} vs as configured", True),
            ("reduced", f"reduced_rows={n} vs as configured", True),
            ("reduced_attention", f"reduced_attention_rows={n} vs as configured", True),
            ("library_attention", "as configured vs reduced_attention_rows=0", False),
            ("unpaired", "as configured vs paired_cache=false", False),
            ("efficient_attention", "decode_attention_kernel=efficient vs as configured", True),
            ("triton_attention", "decode_attention_kernel=triton vs as configured", True),
            ("library_kernel", "as configured vs decode_attention_kernel=library", False),
            ("block_64", "as configured vs the Triton kernel's blocks of 64 positions", False),
            ("separate_step", "as configured vs attention_step_rows=0", False),
            ("uncompiled_prompt", "as configured vs compiled_prompt=false", False),
            ("grouped", "grouped decoding attention vs as configured", True),
            ("sdpa", f"decode_attention={row.get('decode_attention')} vs sdpa", False),
            ("again", "as configured: measured again after the other rows vs first", True),
        )
        for name, label, wins in comparisons:
            other = _get(row, f"{backend}_{name}", "new_tokens_per_s")
            if other is not None:
                slow, fast = (configured, other) if wins else (other, configured)
                line(f"{n} stream(s), {label}", slow, fast, None)
    for name, row in results.get("prefix", {}).items():
        line(
            f"1 stream, {name} ({row['prompts']} questions, 4 per document), prompt-prefix reuse vs off: new "
            f"tokens/s ({_get(row, 'on', 'reused_prompt_share') or 0:.2f} of prompt tokens reused, answers "
            f"equal {row.get('answers_equal', 0):.2f})",
            _get(row, "off", "new_tokens_per_s"),
            _get(row, "on", "new_tokens_per_s"),
            None,
        )
    for name, row in results.get("speculative", {}).items():
        line(
            f"1 stream, {name} ({row['prompts']} prompts), prompt-lookup decoding, "
            f"{row['drafts']} drafts "
            f"vs off: new tokens/s ({_get(row, 'on', 'new_tokens_per_step') or 0:.2f} per step, answers "
            f"equal {row.get('answers_equal', 0):.2f})",
            _get(row, "off", "new_tokens_per_s"),
            _get(row, "on", "new_tokens_per_s"),
            "stream_1_tokens_per_s",
        )
    for spec, row in results.get("learn1", {}).items():
        line(
            f"learn one {row['doc_tokens']}-token doc, `{spec}`, s",
            _get(row, "default", "seconds"),
            _get(row, "fast", "seconds"),
            "learn1_seconds",
            higher=False,
        )
    r = results.get("learn_many", {})
    if r:
        epochs = _get(r, "batched", "epochs")
        line(
            f"learn {r['documents']:,} docs at once, `{r['spec']}`"
            f"{'' if epochs is None else f', {epochs} epochs'}, doc tokens/s (eager: "
            f"{_get(r, 'sequential', 'documents')} one at a time, default options)",
            _get(r, "sequential", "doc_tokens_per_s"),
            _get(r, "batched", "doc_tokens_per_s"),
            "learn_many_doc_tokens_per_s",
        )
    r = results.get("teacher", {})
    if r:
        equal = r.get("continuations_equal")
        line(
            f"teacher signals of {r['documents']} documents, documents/s (eager: one at a time; fast: "
            f"together{'' if equal is None else f', {equal:.0%} of continuations alike'})",
            _get(r, "eager_one_at_a_time", "documents_per_s"),
            _get(r, backend, "documents_per_s"),
            None,
        )
    r = results.get("tasks", {})
    if r:
        line(
            f"task training, examples/s (batch {_get(r, 'default', 'batch_size')} -> "
            f"{_get(r, 'large_batch', 'batch_size')})",
            _get(r, "default", "examples_per_s"),
            _get(r, "large_batch", "examples_per_s"),
            "task_examples_per_s",
        )
        if "large_batch_eager" in r and "large_batch" in r:
            losses = f"final losses {_get(r, 'large_batch_eager', 'final_loss'):.4f} -> "
            losses += f"{_get(r, 'large_batch', 'final_loss'):.4f}"
            line(
                f"task training at batch {_get(r, 'large_batch', 'batch_size')}, examples/s (eager -> "
                f"compiled steps; {losses})",
                _get(r, "large_batch_eager", "examples_per_s"),
                _get(r, "large_batch", "examples_per_s"),
                None,
            )
    r = results.get("service", {})
    if r:
        who = (
            f"service, {r['clients']} clients x {r['requests_per_client']} requests, max_batch "
            f"{r['max_batch']}"
        )
        line(f"{who}: new tokens/s (batches -> continuous)", *_pair(r, "new_tokens_per_s"), None)
        line(f"{who}: p50 latency s", *_pair(r, "latency_p50_s"), None, higher=False)
        line(f"{who}: p95 latency s", *_pair(r, "latency_p95_s"), None, higher=False)
    r = results.get("int8", {})
    for kind in r.get("kinds", ["int8"] if "int8" in r else []):
        equal = r[kind].get("answers_equal", r.get("answers_equal", float("nan")))
        line(
            f"1 stream, float32 eager -> `model.quantize: {kind}` {backend}, new tokens/s "
            f"({r['prompts']} prompts; answers equal to float32: {equal:.2f})",
            _get(r, "float32", "new_tokens_per_s"),
            _get(r, kind, "new_tokens_per_s"),
            None,
        )
    rows = {k: r for k, r in results.get("strategies", {}).items() if _get(r, backend, "ratio_to_base")}
    if rows:
        lines += [
            "",
            f"Answer latency per strategy, one stream (ratio to the base model on the same path; target "
            f"<= {TARGETS['strategy_latency_ratio_max']}x; warm-up: the first {backend} calls, compiling; "
            + (
                f"every answer {s['new_tokens']} new tokens)"
                if s.get("strategy_answers_of_equal_length")
                else f"answers of up to {s['new_tokens']} new tokens)"
            ),
            "",
            f"| strategy | learn s | eager s | x base | {backend} s | x base | warm-up s "
            "| answers equal to eager |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for spec, r in rows.items():
            lines.append(
                f"| `{spec}` | {r['learn_seconds']:.1f} | {r['eager']['latency_s']:.3f} | "
                f"{r['eager']['ratio_to_base']:.2f} | {r[backend]['latency_s']:.3f} | "
                f"{r[backend]['ratio_to_base']:.2f} | {r[backend].get('warmup_seconds', float('nan')):.1f} | "
                f"{r['answers_equal_fraction']:.2f} |"
            )
    r = results.get("service", {})
    if _get(r, "continuous", "latency_p50_by_budget_s"):
        lines += [
            "",
            f"Service requests ({r['clients']} closed-loop clients, greedy chat answers, `{r['backend']}` "
            f"backend, cache rows of {r['continuous_length']} positions; answers equal in both modes: "
            f"{r.get('answers_equal_fraction', float('nan')):.2f}), p50 latency by answer budget:",
            "",
            "| budget (new tokens) | batches s | continuous s |",
            "|---:|---:|---:|",
        ]
        for budget, on in r["continuous"]["latency_p50_by_budget_s"].items():
            off = _get(r, "batch", "latency_p50_by_budget_s", budget)
            lines.append(f"| {budget} | {'' if off is None else f'{off:.2f}'} | {on:.2f} |")
    if results.get("section_seconds"):
        lines += ["", "Seconds per section: " + ", ".join(
            f"{k} {v:.0f}" for k, v in results["section_seconds"].items()
        )]  # fmt: skip
    if results.get("errors"):
        lines += ["", *(f"- section `{k}` failed: {v}" for k, v in results["errors"].items())]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "speed.png")


def _pair(row: dict[str, Any], key: str) -> tuple[float | None, float | None]:
    """(continuous batching off, on) of one service figure."""
    return _get(row, "batch", key), _get(row, "continuous", key)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backend = results["meta"]["settings"]["backend"]
    panels = []

    def pairs(rows: dict[str, Any], slow: tuple[str, ...], fast: tuple[str, ...]) -> list[tuple]:
        out = [(name, _get(r, *slow), _get(r, *fast)) for name, r in rows.items()]
        return [x for x in out if x[1] is not None and x[2] is not None]

    done = pairs(results.get("streams", {}), ("eager", "new_tokens_per_s"), (backend, "new_tokens_per_s"))
    if done:
        panels.append(("new tokens/s", [f"{n} stream(s)" for n, _, _ in done], done))
    done = pairs(results.get("strategies", {}), ("eager", "latency_s"), (backend, "latency_s"))
    if done:
        panels.append(("answer latency s (1 stream)", [n for n, _, _ in done], done))
    done = pairs(results.get("learn1", {}), ("default", "seconds"), ("fast", "seconds"))
    if done:
        panels.append(("seconds", [f"learn 1 doc s\n{n}" for n, _, _ in done], done))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4))
    axes = [axes] if not hasattr(axes, "__len__") else list(axes)
    for ax, (title, names, rows) in zip(axes, panels):
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], 0.4, label="eager / default")
        ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], 0.4, label=f"{backend} / fast options")
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['meta']['model']} on {results['meta']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _counts(text: str) -> list[int]:
    """Comma-separated stream counts (``none`` or empty: none)."""
    return [int(x) for x in text.split(",") if x and x != "none"]


def _inductor_option(item: str) -> tuple[str, Any]:
    name, value = item.split("=", 1)
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--backend", default="compiled", choices=["static", "compiled"])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    parser.add_argument("--quick", action="store_true", help="small sizes for the CPU")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--streams", default=None, help="comma-separated prompt counts (default 1,64,256)")
    parser.add_argument(
        "--eager-streams", default=None, help="streams: counts with the eager baseline (default: all)"
    )
    parser.add_argument(
        "--unfused",
        default="",
        help="streams: counts also measured with generation.fused_projections=never, after the headlines",
    )
    parser.add_argument(
        "--tuned",
        default="",
        help="streams: counts also measured with the --inductor options (a compile each)",
    )
    parser.add_argument(
        "--learn1-benchmark",
        default="novel_facts",
        help="learn1: the benchmark whose document closest to 200 tokens is learned (novel_facts, news)",
    )
    parser.add_argument(
        "--speculative-drafts",
        type=int,
        default=4,
        help="speculative: draft tokens per step with prompt-lookup decoding on",
    )
    parser.add_argument(
        "--speculative-prompts", type=int, default=8, help="speculative: prompts answered per timed call"
    )
    parser.add_argument(
        "--document-benchmarks",
        default="novel_facts,news",
        help="speculative, prefix: knowledge benchmarks whose documents (with questions) are prompt sets",
    )
    parser.add_argument(
        "--untuned",
        default="",
        help="streams: counts also measured without tuning the decoding step's kernels "
        "(generation.tuned_rows=0)",
    )
    parser.add_argument(
        "--not-ahead",
        default="",
        help="streams: counts also measured with each chunk read before the next is queued "
        "(generation.ahead_rows=0)",
    )
    parser.add_argument(
        "--again",
        default="",
        help="streams: counts whose configured path is measured once more after every other row (the "
        "order's share of a difference)",
    )
    parser.add_argument(
        "--ahead",
        default="",
        help="streams: counts also measured with the next chunk queued before the last is read "
        "(generation.ahead_rows=N)",
    )
    parser.add_argument(
        "--reduced",
        default="",
        help="streams: counts also measured with the products as generated reductions "
        "(generation.reduced_rows=N)",
    )
    parser.add_argument(
        "--reduced-attention",
        default="",
        help="streams: counts also measured with the attention as generated reductions "
        "(generation.reduced_attention_rows=N)",
    )
    parser.add_argument(
        "--unpaired",
        default="",
        help="streams: counts also measured with keys and values cached in two tensors "
        "(generation.paired_cache=false)",
    )
    parser.add_argument(
        "--efficient-attention",
        default="",
        help="streams: counts also measured with the grouped decoding attention held to the memory-efficient "
        "kernel (generation.decode_attention_kernel=efficient)",
    )
    parser.add_argument(
        "--triton-attention",
        default="",
        help="streams: counts also measured with the grouped decoding attention as one Triton kernel "
        "(generation.decode_attention_kernel=triton)",
    )
    parser.add_argument(
        "--library-kernel",
        default="",
        help="streams: counts also measured with PyTorch's choice of decoding attention kernel "
        "(generation.decode_attention_kernel=library)",
    )
    parser.add_argument(
        "--block-64",
        default="",
        help="streams: counts also measured with the Triton decoding attention reading 64 cached positions "
        "per loop iteration (as before its block followed the cache's length)",
    )
    parser.add_argument(
        "--separate-step",
        default="",
        help="streams: counts also measured with Hugging Face's attention layers around the Triton kernel "
        "(generation.attention_step_rows=0) in place of one-kernel steps",
    )
    parser.add_argument(
        "--uncompiled-prompt",
        default="",
        help="streams: counts also measured with the recorded prompt pass uncompiled "
        "(generation.compiled_prompt=false)",
    )
    parser.add_argument(
        "--library-attention",
        default="",
        help="streams: counts also measured with the library's attention kernel "
        "(generation.reduced_attention_rows=0)",
    )
    parser.add_argument(
        "--sdpa",
        default="",
        help="streams: counts also measured with the model attention (generation.decode_attention=sdpa)",
    )
    parser.add_argument(
        "--grouped",
        default="",
        help="streams: counts also measured with grouped decoding attention (generation.decode_attention)",
    )
    parser.add_argument(
        "--inductor",
        action="append",
        default=[],
        help="streams, --tuned: an inductor option name=value (the value read as JSON where it parses)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one more fast call under the profiler (GPU kernels and busy time): per stream count (streams), "
        "per document (learn1, learn_many), per example (tasks)",
    )
    parser.add_argument(
        "--host-check",
        default="1,64",
        help="streams: counts whose recorded chunks are checked against the step driven from the host",
    )
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--interleave", action="store_true", help="streams: alternate eager and fast calls rep by rep"
    )
    parser.add_argument("--warmup", type=int, default=2, help="fast-path calls before timing (compilation)")
    parser.add_argument("--batch-size", type=int, default=16, help="generation.batch_size outside streams")
    parser.add_argument("--strategies", default=None, help="comma-separated specs (default: every strategy)")
    parser.add_argument(
        "--free-lengths",
        action="store_true",
        help="strategies: answers may end before --new-tokens (default: every answer decodes that many, "
        "so the latencies compare the same work)",
    )
    parser.add_argument("--strategy-docs", type=int, default=None)
    parser.add_argument("--probes", type=int, default=None)
    parser.add_argument(
        "--batched-learning", action="store_true", help="strategies learn with learn_documents"
    )
    parser.add_argument("--learn-specs", default="ttt", help="comma-separated ttt-like specs for learn1")
    parser.add_argument(
        "--fast-optim", default=None, help="speed options, e.g. pack_tokens=512:autocast=true"
    )
    parser.add_argument("--many", type=int, default=None, help="documents learned at once")
    parser.add_argument("--sequential", type=int, default=None, help="of which learned one at a time")
    parser.add_argument(
        "--many-epochs", type=int, default=0, help="epochs of the --many batch (0: the strategy's setting)"
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="learn_many: move every Python object made so far (the compiler's included) out of the garbage "
        "collector's reach after the warm-up (gc.freeze), to see what full collections cost the timed call",
    )
    parser.add_argument(
        "--teacher-docs", type=int, default=None, help="teacher: documents (quick 4, else 32)"
    )
    parser.add_argument("--task-examples", type=int, default=None)
    parser.add_argument("--task-batch", type=int, default=64)
    parser.add_argument(
        "--task-eager",
        action="store_true",
        help="tasks: the large batch uncompiled on a GPU too (no tasks.compile row)",
    )
    parser.add_argument("--service-clients", type=int, default=None, help="service: concurrent clients")
    parser.add_argument("--service-requests", type=int, default=None, help="service: requests per client")
    parser.add_argument(
        "--service-tokens", default=None, help="service: comma-separated answer budgets (cycled)"
    )
    parser.add_argument("--service-batch", type=int, default=8, help="service: max_batch")
    parser.add_argument(
        "--service-length", type=int, default=256, help="service: cache positions per continuous row"
    )
    parser.add_argument(
        "--service-backend", default="static", choices=["eager", "static", "compiled"], help="service backend"
    )
    parser.add_argument("--int8-prompts", type=int, default=4, help="int8: prompts answered one at a time")
    parser.add_argument(
        "--quantize-kinds",
        type=lambda text: [k for k in text.split(",") if k],
        default=["int8", "int8_weights"],
        help="int8: the model.quantize kinds measured beside float32 (comma-separated)",
    )
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed/local"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    q = args.quick
    args.streams = [int(x) for x in (args.streams or ("1,4" if q else "1,64,256")).split(",")]
    args.eager_streams = args.streams if args.eager_streams is None else _counts(args.eager_streams)
    for name in (
        "unfused",
        "tuned",
        "untuned",
        "not_ahead",
        "again",
        "ahead",
        "reduced",
        "reduced_attention",
        "library_attention",
        "unpaired",
        "efficient_attention",
        "triton_attention",
        "library_kernel",
        "block_64",
        "separate_step",
        "uncompiled_prompt",
        "grouped",
        "sdpa",
        "host_check",
    ):
        setattr(args, name, _counts(getattr(args, name)))
    args.inductor = dict(_inductor_option(item) for item in args.inductor)
    args.document_benchmarks = [name for name in args.document_benchmarks.split(",") if name]
    args.new_tokens = args.new_tokens or (16 if q else 64)
    args.strategy_docs = args.strategy_docs or (2 if q else 20)
    args.probes = args.probes or (3 if q else 8)
    args.many = args.many or (8 if q else 1000)
    args.sequential = args.sequential or (2 if q else 10)
    args.task_examples = args.task_examples or (64 if q else 2048)
    args.teacher_docs = args.teacher_docs or (4 if q else 32)
    args.service_clients = args.service_clients or (4 if q else 16)
    args.service_requests = args.service_requests or (2 if q else 4)
    args.service_tokens = [
        int(x) for x in (args.service_tokens or ("8,16,32" if q else "8,16,32,64")).split(",")
    ]
    args.learn_specs = [s for s in args.learn_specs.split(",") if s]
    args.strategies = (
        [s for s in args.strategies.split(",") if s] if args.strategies else list(registry.names())
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(
        set_items=[
            f"model.name={args.model}",
            f"model.device={args.device}",
            f"model.dtype={args.dtype}",
            f"generation.batch_size={args.batch_size}",
            *args.set,
        ]
    )
    backbone = Backbone.load(config.model, config.generation)
    cuda = backbone.device.type == "cuda"
    if args.fast_optim is None:
        args.fast_optim = "pack_tokens=512:autocast=true:batch_size=16" if cuda else "pack_tokens=512"
    args.fast_optim = dict(kv.split("=", 1) for kv in args.fast_optim.split(":") if kv)
    import transformers

    results: dict[str, Any] = {
        "meta": system.meta(
            backbone.name,
            backbone.device,
            {
                "backend": args.backend,
                "dtype": str(backbone.dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(),
                "new_tokens": args.new_tokens,
                "strategy_answers_of_equal_length": not args.free_lengths,
                "streams": args.streams,
                "fused_projections": backbone.generation.fused_projections,
                "attention_step_rows": backbone.generation.attention_step_rows,
                "inductor_options": args.inductor,
                "quick": q,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "fast_optim": args.fast_optim,
                "command": " ".join(["python", "benchmarks/speed.py", *(argv or sys.argv[1:])]),
                "overrides": list(args.set),
            },
        )
    }
    bench = load_benchmark(
        "novel_facts", n_docs=max(args.many, args.strategy_docs, args.teacher_docs, 8), seed=0
    )
    prompts = [p.prompt for p in bench.probes if p.kind == "qa"]
    wanted = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; use {', '.join(SECTIONS)}")

    def save() -> None:
        write(results, args.out)

    for section in wanted:
        start = time.perf_counter()
        try:
            filled = results[section] = {}  # each figure lands here as it finishes, saved at once
            if section == "streams":
                streams(backbone, args, prompts, filled, save)
            elif section == "speculative":
                sets = {"questions": prompts}
                for name in args.document_benchmarks:
                    sets[f"{name}_documents"] = document_prompts(backbone, name, args.speculative_prompts)
                speculative(backbone, args, sets, filled, save)
            elif section == "prefix":
                sets = {name: questions_per_document(name, 2, 4) for name in args.document_benchmarks}
                prefix(backbone, args, sets, filled, save)
            elif section == "strategies":
                strategies(backbone, args, config, bench, filled, save)
            elif section == "learn1":
                learn1(backbone, args, config, bench, filled, save)
            elif section == "learn_many":
                learn_many(backbone, args, config, bench, filled, save)
            elif section == "teacher":
                teacher(backbone, args, config, bench, filled, save)
            elif section == "tasks":
                tasks(backbone, args, config, filled, save)
            elif section == "service":
                service(backbone, args, config, prompts, filled, save)
            elif section == "int8":
                int8(backbone, args, config, prompts, filled, save)
        except Exception as exc:  # one failed section must not cost the others' figures
            logger.exception("section %s failed", section)
            results.setdefault("errors", {})[section] = repr(exc)
        if not results.get(section):
            results.pop(section, None)
        results.setdefault("section_seconds", {})[section] = time.perf_counter() - start
        write(results, args.out)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
