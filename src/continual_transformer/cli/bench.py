"""Benchmark commands: every strategy beside its baselines on identical documents, and the task-incremental
suites. The harnesses live in :mod:`continual_transformer.evaluation` and :mod:`continual_transformer.tasks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from continual_transformer.cli.common import (
    console,
    emit_json,
    options,
    progress_bar,
    quiet_transformers,
    say,
    status,
)

bench_app = typer.Typer(
    help="Benchmarks: every strategy beside its baselines, in one run.", no_args_is_help=True
)


@bench_app.command("knowledge")
def bench_knowledge(
    ctx: typer.Context,
    strategies: Annotated[
        str,
        typer.Option(
            help="Comma-separated strategies; the baselines none, in_context, "
            "finetune and lora always run beside them."
        ),
    ] = "",
    benchmark: Annotated[
        str,
        typer.Option(
            "--benchmark", "--dataset", help="novel_facts, boolq, news, or a custom JSONL file/directory."
        ),
    ] = "novel_facts",
    docs: Annotated[int | None, typer.Option(help="Documents learned (default 50; 8 with --quick).")] = None,
    seed: Annotated[int, typer.Option(help="Benchmark seed.")] = 0,
    batches: Annotated[int | None, typer.Option(help="Stream batches (default 5; 2 with --quick).")] = None,
    together: Annotated[
        bool,
        typer.Option(
            "--learn-together", help="Learn each batch's documents in one training run (learn_documents)."
        ),
    ] = False,
    quick: Annotated[bool, typer.Option(help="Small profile that finishes on a CPU in minutes.")] = False,
    out: Annotated[Path, typer.Option(help="Results directory.")] = Path("benchmarks/results/knowledge"),
    baselines: Annotated[
        bool,
        typer.Option(
            help="Run the four baselines beside the strategies (turn off only to "
            "add strategies to an earlier run's results)."
        ),
    ] = True,
    resume: Annotated[
        bool,
        typer.Option(
            help="Save each strategy's state and stream progress after every batch under OUT/resume, and "
            "continue from there: rows already in OUT/results.json are kept, a stream saved by an earlier "
            "process of the same run goes on where it stopped (another run's save is refused)."
        ),
    ] = False,
) -> None:
    """Acquisition, retention, general-ability change and cost of every strategy on identical documents."""
    import dataclasses

    from continual_transformer import Backbone
    from continual_transformer.evaluation.knowledge import (
        QUICK,
        KnowledgeBenchConfig,
        run_knowledge_bench,
        with_strategies,
    )
    from continual_transformer.evaluation.report import (
        knowledge_markdown,
        read_knowledge_results,
        write_knowledge_results,
    )
    from continual_transformer.evaluation.resume import remove_stream, state_directory

    opts = options(ctx)
    cfg = opts.config()
    quiet_transformers(opts)
    base = QUICK if quick else KnowledgeBenchConfig()
    changes = {"benchmark": benchmark, "seed": seed, "learn_together": together}
    if docs is not None:
        changes["docs"] = docs
    if batches is not None:
        changes["stream_batches"] = batches
    bench = dataclasses.replace(base, **changes)
    requested = [s.strip() for s in strategies.split(",") if s.strip()]
    names = with_strategies(requested) if baselines else requested
    with status("loading model...", opts):
        backbone = Backbone.load(cfg.model, cfg.generation)
    say(
        f"{', '.join(names)} on {bench.docs} {bench.benchmark} documents ({backbone.name}, {backbone.device})"
    )

    earlier: dict = {}
    if (resume or not baselines) and (out / "results.json").is_file():
        earlier = read_knowledge_results(out / "results.json", backbone.name, dataclasses.asdict(bench))
    if resume:
        done = [name for name in names if name in earlier.get("strategies", {})]
        if done:
            say(f"kept from {out / 'results.json'}: {', '.join(done)}")
        names = [name for name in names if name not in done]

    def merged(results: dict) -> dict:
        return {**results, "strategies": {**earlier.get("strategies", {}), **results["strategies"]}}

    with progress_bar(opts) as bar:
        task = bar.add_task("strategies", total=len(names))

        def progress(name: str, row: dict, results: dict) -> None:
            bar.advance(task)
            say(
                f"  {name}: acquisition {row['acquisition_contains']:.3f}, "
                f"PPL change {row['ppl_change']:+.1%}, {row['wall_seconds']:.0f}s"
            )
            write_knowledge_results(merged(results), out)  # an interrupted run keeps every finished strategy
            if resume:
                remove_stream(state_directory(out / "resume", name))  # its row is written

        results = merged(
            run_knowledge_bench(
                backbone, cfg, names, bench, on_result=progress, resume=out / "resume" if resume else None
            )
        )
    paths = write_knowledge_results(results, out)
    if opts.json:
        emit_json({"results": str(out / "results.json"), "files": [str(p) for p in paths]})
        return
    from rich.markdown import Markdown

    console.print(Markdown(knowledge_markdown(results)))
    say("wrote " + ", ".join(str(p) for p in paths))


@bench_app.command("tasks")
def bench_tasks_command(
    ctx: typer.Context,
    suite: Annotated[
        str, typer.Option(help="clinc150-10, clinc150-50, banking77 or long15.")
    ] = "clinc150-10",
    methods: Annotated[str | None, typer.Option(help="Comma-separated methods (default: all).")] = None,
    quick: Annotated[bool, typer.Option(help="Small profile for a CPU.")] = False,
    out: Annotated[Path | None, typer.Option(help="Results directory.")] = None,
    order: Annotated[int | None, typer.Option(help="Task order (long15 has 3).")] = None,
    num_tasks: Annotated[int | None, typer.Option(help="Only the first N tasks.")] = None,
    workers: Annotated[int, typer.Option(help="Methods in parallel processes (GPU).")] = 1,
    add: Annotated[
        bool,
        typer.Option(
            help="Keep the methods already in --out (same suite and settings) and add "
            "these: one suite measured in several sittings."
        ),
    ] = False,
    setting: Annotated[
        list[str] | None,
        typer.Option(
            help="Profile override KEY=VALUE, repeatable (learner.router=minilm, max_train_per_label=8)."
        ),
    ] = None,
) -> None:
    """Task-incremental benchmark: accuracy matrix, BWT/FWT, routed accuracy, parameters and bytes over
    tasks."""
    from continual_transformer.tasks.benchmark import bench_tasks

    opts = options(ctx)
    cfg = opts.config()
    quiet_transformers(opts)
    bench_tasks(
        suite=suite,
        methods=methods,
        quick=quick,
        out=out,
        data_dir=cfg.data_dir,
        model=cfg.model.name,
        device=cfg.model.device,
        dtype=cfg.model.dtype,
        order=order,
        num_tasks=num_tasks,
        seed=cfg.seed,
        workers=workers,
        add=add,
        overrides=setting or (),
        progress=lambda method, summary: say(f"  {method} done"),
    )
    target = out or Path("benchmarks/results/tasks") / suite
    plots = sorted(str(p) for p in target.glob("*.png")) if target.is_dir() else []
    say(f"wrote {target}" + (f"; plots: {', '.join(plots)}" if plots else ""))
