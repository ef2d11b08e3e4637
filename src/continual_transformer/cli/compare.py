"""``ctt compare`` and ``ctt demo``: strategies side by side on one document and its questions
(:mod:`continual_transformer.demo`), printed as a table, ``--json``, and a PNG plot."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from continual_transformer.cli.common import (
    Options,
    UsageError,
    console,
    emit_json,
    options,
    progress_bar,
    quiet_transformers,
    say,
    status,
)

if TYPE_CHECKING:
    from continual_transformer.backbone import Backbone
    from continual_transformer.config import Config
    from continual_transformer.demo import Comparison, DemoResult


def load_backbone(opts: Options, config: Config) -> Backbone:
    from continual_transformer.backbone import Backbone

    quiet_transformers(opts)
    start = time.perf_counter()
    with status(f"loading {config.model.name}...", opts):
        backbone = Backbone.load(config.model, config.generation)
    if not opts.json:
        say(
            f"model {backbone.name} loaded in {time.perf_counter() - start:.1f}s on {backbone.device} "
            f"({backbone.num_parameters() / 1e6:.1f}M parameters)"
        )
    return backbone


def parse_strategies(text: str) -> list[str]:
    from continual_transformer.evaluation.knowledge import parse_strategy_spec

    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UsageError("give at least one strategy (--strategies retrieval,finetune)")
    for name in names:
        parse_strategy_spec(name)  # unknown names and settings fail before the model loads
    return names


def comparison_table(comparison: Comparison, *, recommended: str | None = None) -> Table:
    table = Table(title="strategies side by side (same document, same questions)")
    columns = ("strategy", "accuracy", "learn s", "answer s", "tokens learned", "general PPL", "known facts")
    for column in columns:
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for row in comparison.rows:
        name = row.strategy + (" (recommended)" if row.strategy == recommended else "")
        name = name + " (before learning)" if row.strategy == "none" else name
        table.add_row(
            name,
            f"{row.accuracy:.0%}",
            f"{row.learn_seconds:.1f}",
            f"{row.answer_seconds:.2f}",
            str(row.tokens_learned),
            f"{row.ppl_change:+.1%}",
            f"{row.known_facts_kept}/{row.known_facts}",
        )
    return table


def run_with_progress(opts: Options, total: int, call):
    """Run ``call(on_result)`` with a progress bar over strategies and a line per finished strategy."""
    with progress_bar(opts) as bar:
        task = bar.add_task("strategies", total=total)

        def on_result(name: str, row: dict) -> None:
            bar.advance(task)
            if not opts.json:
                say(
                    f"  {name}: accuracy {row['final_contains']:.0%}, general PPL {row['ppl_change']:+.1%}, "
                    f"{row['wall_seconds']:.0f}s"
                )

        return call(on_result)


def compare(
    ctx: typer.Context,
    document: Annotated[str, typer.Argument(help="Document file or directory to learn (- reads stdin).")],
    questions: Annotated[
        Path, typer.Argument(help='JSONL question-answer pairs: {"question": ..., "answer": ...} a line.')
    ],
    strategies: Annotated[
        str, typer.Option(help="Comma-separated strategies (settings after colons: ttt:objective=...).")
    ] = "retrieval,in_context,finetune",
    out: Annotated[Path, typer.Option(help="Where results.json and the plots go.")] = Path("ctt-compare"),
    ppl_tokens: Annotated[int, typer.Option(help="Tokens of general text scored for perplexity.")] = 2048,
    known_facts: Annotated[int, typer.Option(help="General-knowledge probes asked.")] = 16,
) -> None:
    """Strategies side by side on a document and its questions: accuracy, learn and answer time, tokens
    learned, forgetting (general-text perplexity, known facts kept); a table and a PNG plot."""
    from continual_transformer.cli.state import read_inputs
    from continual_transformer.demo import CompareSettings, compare_strategies, read_qa

    opts = options(ctx)
    config = opts.config()
    names = parse_strategies(strategies)
    documents = read_inputs([document], config.documents)
    qa = read_qa(questions)
    backbone = load_backbone(opts, config)
    settings = CompareSettings(ppl_tokens=ppl_tokens, known_facts=known_facts)
    comparison = run_with_progress(
        opts,
        len(names) + 1,
        lambda hook: compare_strategies(
            backbone, config, documents, qa, names, settings, out=out, on_result=hook
        ),
    )
    if opts.json:
        emit_json(comparison.to_dict())
        return
    console.print(comparison_table(comparison))
    say(f"results: {out / 'results.json'}; plots: {', '.join(str(p) for p in comparison.plots)}")


def demo(
    ctx: typer.Context,
    strategies: Annotated[
        str | None,
        typer.Option(help="Strategies whose forgetting price is shown (default: the demo's set)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Where results.json and the plots go.")] = Path("ctt-demo"),
) -> None:
    """The recommended strategy learns a document of fictional facts: answers before and after, and beside
    it the forgetting price of each strategy on the same document."""
    from continual_transformer.demo import DEMO_STRATEGIES, RECOMMENDED_STRATEGY, run_demo

    opts = options(ctx)
    config = opts.config()
    names = parse_strategies(strategies) if strategies else list(DEMO_STRATEGIES)
    recommended = opts.strategy or RECOMMENDED_STRATEGY
    backbone = load_backbone(opts, config)
    result = run_with_progress(
        opts,
        len(set(names) | {recommended}) + 1,
        lambda hook: run_demo(
            backbone, config, strategies=names, recommended=recommended, out=out, on_result=hook
        ),
    )
    if opts.json:
        emit_json(
            {
                "recommended": result.strategy,
                "answers": [
                    {
                        "question": r.question,
                        "expected": r.expected,
                        "before": r.before,
                        "after": r.after,
                        "correct_before": r.correct_before,
                        "correct_after": r.correct_after,
                    }
                    for r in result.rows
                ],
                **result.comparison.to_dict(),
            }
        )
        return
    print_demo(result)


def print_demo(result: DemoResult) -> None:
    table = Table(
        title=f"What the model answers, before and after {result.strategy} learned the document",
        show_lines=True,
    )
    for column in ("question", "expected", "before learning", f"after ({result.strategy})"):
        table.add_column(column, overflow="fold")
    for row in result.rows:
        table.add_row(
            row.question,
            row.expected,
            _mark(row.before, row.correct_before),
            _mark(row.after, row.correct_after),
        )
    console.print(table)
    say(
        f"correct: {result.accuracy_before:.0%} before -> {result.accuracy_after:.0%} after "
        f"({result.strategy})"
    )
    console.print(comparison_table(result.comparison, recommended=result.strategy))
    say(
        f"{result.strategy} is the default recommendation: the price of learning is the perplexity change on "
        "general text and the general facts lost; strategies that write the document into weights pay it."
    )
    say(f"plots: {', '.join(str(p) for p in result.comparison.plots)}")


def _mark(text: str, correct: bool) -> str:
    return ("[green]✓[/green] " if correct else "[red]✗[/red] ") + text.replace("[", "\\[")
