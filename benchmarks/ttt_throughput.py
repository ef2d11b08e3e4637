"""Learning throughput of the ``ttt`` update step: tokens per second over a grid of mini-batch shapes.

One timed step is exactly what :func:`continual_transformer.training.train` does per mini-batch for ``ttt``:
forward + loss (:func:`training.batch_loss`), backward into the dual MLPs' trainable copies, the gradient mask
(with ``--sparse``), clipping, ``optimizer.step()`` and ``zero_grad``. Grid: batch x window tokens, optimizer
(AdamW, AdamW(fused=True) where CUDA, SGD), and eager vs ``torch.compile`` of the forward (regional: each
decoder layer is compiled, one compilation serves every layer; default mode, so no CUDA graphs — eager is the
CUDA-graph-free baseline). A compile that fails is recorded and skipped, never fatal.

Runs offline: the model is a packaged name, a Hugging Face id already in the cache, or a local directory.

    python benchmarks/ttt_throughput.py --device cuda --dtype bfloat16             # full grid (H100: < 4 min)
    python benchmarks/ttt_throughput.py --quick --device cpu --dtype float32       # a few small shapes

Writes ``results.json``, ``results.md`` and ``tokens_per_second.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from continual_transformer import training
from continual_transformer.backbone import Backbone, resolve_device, resolve_dtype
from continual_transformer.config import ModelConfig, load_config
from continual_transformer.strategies.ttt import TTTConfig, TTTStrategy

logger = logging.getLogger("ttt_throughput")

FULL_SHAPES = ((1, 32), (8, 128), (16, 256), (32, 512), (64, 512))
QUICK_SHAPES = ((1, 32), (2, 64), (4, 64))


@dataclass
class Row:
    compile: str
    optimizer: str
    batch: int
    window: int
    tokens_per_step: int
    status: str
    steps: int = 0
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    ms_per_step: float = 0.0
    peak_memory_gib: float | None = None
    setup_seconds: float = 0.0
    """Warm-up time (includes compilation for ``compile`` rows)."""


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    shapes = []
    for item in text.split(","):
        b, t = item.lower().split("x")
        shapes.append((int(b), int(t)))
    return tuple(shapes)


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return training.make_optimizer(params, "adamw", lr, 0.0)  # the library's optimizer (foreach AdamW)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    if name == "sgd":
        return training.make_optimizer(params, "sgd", lr, 0.0)
    raise ValueError(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    def __init__(self, backbone: Backbone, strategy: TTTStrategy, *, sparse: bool, seed: int) -> None:
        self.backbone = backbone
        self.strategy = strategy
        self.params = list(strategy.trainable_parameters().values())
        self.sparse = sparse
        self.generator = torch.Generator().manual_seed(seed)
        for dual in strategy.duals:
            dual.mark_changed()  # the copies compute from the first step, as in TTTStrategy.learn
        if sparse:  # random neuron masks of the configured size: the cost of masking, not the choice
            for dual in strategy.duals:
                keep = torch.zeros(dual.neurons, dtype=torch.bool)
                keep[
                    torch.randperm(dual.neurons, generator=self.generator)[
                        : strategy._neurons_per_layer(dual)
                    ]
                ] = True
                masks = dual.layout.masks(keep, dict(dual.trainable.named_parameters()))
                strategy._grad_masks.update({id(p): masks[n] for n, p in dual.trainable.named_parameters()})

    def batch(self, b: int, t: int) -> dict[str, torch.Tensor]:
        vocab = self.backbone.model.config.vocab_size
        ids = torch.randint(0, vocab, (b, t), generator=self.generator).to(self.backbone.device)
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}

    def step(self, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> torch.Tensor:
        loss = training.batch_loss(self.backbone, batch)
        loss.backward()
        if self.sparse:
            self.strategy._mask_gradients(self.params)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def measure(self, compile_mode: str, optimizer: str, b: int, t: int, *, warmup: int, steps: int) -> Row:
        device = self.backbone.device
        row = Row(
            compile=compile_mode, optimizer=optimizer, batch=b, window=t, tokens_per_step=b * t, status="ok"
        )
        try:
            opt = make_optimizer(optimizer, self.params, 1e-5)
        except (RuntimeError, ValueError, TypeError) as exc:
            row.status = f"optimizer unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            return row
        batch = self.batch(b, t)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            start = time.perf_counter()
            for _ in range(warmup):
                self.step(batch, opt)
            synchronize(device)
            row.setup_seconds = round(time.perf_counter() - start, 3)
            start = time.perf_counter()
            for _ in range(steps):
                last = self.step(batch, opt)
            synchronize(device)
            elapsed = time.perf_counter() - start
            if not torch.isfinite(last):  # sync: once per measurement
                row.status = "non-finite loss"
        except torch.cuda.OutOfMemoryError:
            row.status = "out of memory"
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return row
        except Exception as exc:  # noqa: BLE001 — compile failures come in many types; record and go on
            row.status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            opt.zero_grad(set_to_none=True)
            return row
        row.steps = steps
        row.seconds = round(elapsed, 4)
        row.tokens_per_second = round(b * t * steps / elapsed, 1)
        row.ms_per_step = round(1000 * elapsed / steps, 2)
        if device.type == "cuda":
            row.peak_memory_gib = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        return row


def compile_layers(backbone: Backbone) -> None:
    """Regional compilation: every decoder layer gets ``torch.compile`` (identical layers share one graph)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # shapes x layers
    for layer in backbone.layers:
        layer.compile()


def uncompile_layers(backbone: Backbone) -> None:
    for layer in backbone.layers:
        layer._compiled_call_impl = None


def random_backbone(source: str, device: torch.device, dtype: torch.dtype, *, seed: int) -> Backbone:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return Backbone(model.to(device), tokenizer, name=f"{Path(source).name} (random weights)")


def machine_info(device: torch.device) -> dict[str, str | int | None]:
    info: dict[str, str | int | None] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def write_markdown(path: Path, meta: dict, rows: list[Row]) -> None:
    lines = [
        "# ttt learning throughput",
        "",
        (
            f"- model: `{meta['model']}`, {meta['trainable_parameters']:,} trainable parameters "
            f"(dual-MLP copies of layers {meta['layers']}), sparse masks: {meta['sparse']}"
        ),
        (
            f"- device: {meta['device']}, dtype: {meta['dtype']}, "
            f"warm-up steps: {meta['warmup']}, timed steps: {meta['steps']}, "
            f"float32 matmul precision: {meta.get('float32_matmul_precision', 'highest')}"
        ),
        f"- machine: {', '.join(f'{k} {v}' for k, v in meta['machine'].items())}",
        "- one step: forward + loss, backward, gradient mask (sparse only), clip, optimizer step, zero_grad",
        "",
        "| compile | optimizer | batch x window | tokens/step | tokens/s | ms/step "
        "| peak GiB | warm-up s | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        peak = "" if r.peak_memory_gib is None else r.peak_memory_gib
        lines.append(
            f"| {r.compile} | {r.optimizer} | {r.batch}x{r.window} | {r.tokens_per_step} | "
            f"{r.tokens_per_second:,.0f} | {r.ms_per_step} | {peak} | {r.setup_seconds} | {r.status} |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(path: Path, meta: dict, rows: list[Row]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.status == "ok":
            series.setdefault((r.compile, r.optimizer), []).append(r)
    for (mode, opt), points in sorted(series.items()):
        points.sort(key=lambda r: r.tokens_per_step)
        ax.plot(
            [p.tokens_per_step for p in points],
            [p.tokens_per_second for p in points],
            marker="o",
            linestyle="-" if mode == "eager" else "--",
            label=f"{mode}, {opt}",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per step (batch x window)")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"ttt update step: {meta['model']} ({meta['device']}, {meta['dtype']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="packaged name, cached HF id or local dir"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ttt_throughput"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small grid {QUICK_SHAPES}, eager, AdamW and SGD, 1 warm-up and 3 timed steps",
    )
    parser.add_argument(
        "--shapes", type=parse_shapes, default=None, help="e.g. 1x32,8x128 (overrides the grid)"
    )
    parser.add_argument("--optimizers", default=None, help="comma list of adamw, adamw_fused, sgd")
    parser.add_argument(
        "--compile",
        choices=("both", "eager", "compile"),
        default=None,
        help="default: both (eager only with --quick)",
    )
    parser.add_argument(
        "--layers", default=TTTConfig.layers, help="ttt layers spec (default: the strategy's)"
    )
    parser.add_argument(
        "--sparse", action="store_true", help="apply gradient masks of trainable_neurons per layer"
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2, quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5, quick 3)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=180.0,
        help="seconds after which remaining measurements are skipped (recorded as skipped)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--matmul-precision",
        choices=("highest", "high", "medium"),
        default="highest",
        help="torch.set_float32_matmul_precision for the float32 trainable copies (high: TF32)",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build the model from the config and tokenizer in --model (a directory) with random "
        "weights: the same step cost where only the config is at hand",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.steps = args.steps if args.steps is not None else (3 if args.quick else 5)
    started = time.perf_counter()
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = resolve_device(args.device)
    if args.random_weights:
        backbone = random_backbone(args.model, device, resolve_dtype(args.dtype, device), seed=args.seed)
    else:
        backbone = Backbone.load(ModelConfig(name=args.model, device=args.device, dtype=args.dtype))
    settings = load_config(overrides={"strategy": "ttt"})
    strategy = TTTStrategy(backbone, TTTConfig(layers=args.layers, sparse=args.sparse), settings=settings)
    params = list(strategy.trainable_parameters().values())
    for p in params:
        p.requires_grad_(True)
    bench = Bench(backbone, strategy, sparse=args.sparse, seed=args.seed)

    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    if args.optimizers:
        optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    else:
        optimizers = ["adamw", "sgd"] + (["adamw_fused"] if device.type == "cuda" and not args.quick else [])
    modes = {"both": ["eager", "compile"], "eager": ["eager"], "compile": ["compile"]}[
        args.compile or ("eager" if args.quick else "both")
    ]
    meta = {
        "model": backbone.name,
        "device": str(device),
        "dtype": str(backbone.dtype).replace("torch.", ""),
        "layers": f"{strategy.layer_ids[0]}..{strategy.layer_ids[-1]}",
        "sparse": args.sparse,
        "trainable_parameters": sum(p.numel() for p in params),
        "warmup": args.warmup,
        "steps": args.steps,
        "shapes": [f"{b}x{t}" for b, t in shapes],
        "optimizers": optimizers,
        "compile_modes": modes,
        "machine": machine_info(device),
        "quick": args.quick,
        "float32_matmul_precision": args.matmul_precision,
    }
    rows: list[Row] = []
    # Training builds no KV cache (a cache would also give every compiled layer its own guard on layer_idx).
    use_cache = getattr(backbone.model.config, "use_cache", None)
    backbone.model.config.use_cache = False
    with backbone.training():
        for mode in modes:
            if mode == "compile":
                compile_layers(backbone)
            for optimizer in optimizers:
                for b, t in shapes:
                    if time.perf_counter() - started > args.time_budget:
                        rows.append(Row(mode, optimizer, b, t, b * t, status="skipped: time budget"))
                        continue
                    row = bench.measure(mode, optimizer, b, t, warmup=args.warmup, steps=args.steps)
                    logger.info(
                        "%-7s %-11s %3dx%-4d %10.0f tokens/s  %s",
                        mode,
                        optimizer,
                        b,
                        t,
                        row.tokens_per_second,
                        row.status,
                    )
                    rows.append(row)
            if mode == "compile":
                uncompile_layers(backbone)
    backbone.model.config.use_cache = use_cache
    for p in params:
        p.requires_grad_(False)
    strategy.close()

    meta["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2)
    )
    write_markdown(args.out / "results.md", meta, rows)
    plotted = plot(args.out / "tokens_per_second.png", meta, rows)
    logger.info(
        "wrote %s (results.json, results.md%s) in %.0fs",
        args.out,
        ", tokens_per_second.png" if plotted else "",
        meta["total_seconds"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
