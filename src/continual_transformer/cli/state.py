"""Commands on a state directory: learn, ask, generate, and everything that shows or changes the state
(state show, history, info, forgetting, forget, reset, use, action, checkpoints).

Each command is a thin wrapper: it opens the state (under its lock when it writes), calls one function of
this module that the interactive menu calls too with its already loaded session, and prints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from continual_transformer.cli.common import (
    DEFAULT_CHECKPOINTS,
    DEFAULT_STATE,
    AllowEmptyOption,
    CheckpointsOption,
    Options,
    StateOption,
    UsageError,
    build_session,
    console,
    emit_json,
    human_bytes,
    num,
    options,
    progress_bar,
    read_text_argument,
    say,
)

if TYPE_CHECKING:
    from continual_transformer.config import DocumentConfig
    from continual_transformer.documents import Document
    from continual_transformer.locking import StateLock
    from continual_transformer.session import Session

LockTimeoutOption = Annotated[
    float, typer.Option(help="Seconds to wait while another process writes the same --state.")
]


# -- shared by the commands and the menu ---------------------------------------------------------------------
@dataclass(frozen=True)
class LearnOutcome:
    rows: list[dict[str, Any]]
    """One per document learned now: id, tokens, loss before / after, seconds."""
    skipped: list[str]
    """Documents already learned (by content), with the id they were learned under."""
    total: int
    """Documents in the state after learning."""


def read_inputs(paths: list[str], config: DocumentConfig) -> list[Document]:
    """Documents from files / directories, or from stdin for ``-`` (all validated before any learning)."""
    from continual_transformer.documents import make_document, read_documents

    documents = []
    for path in paths:
        if str(path) == "-":
            documents.append(make_document(read_text_argument("-", "the document"), source=None))
        else:
            documents.extend(read_documents(path, config))
    return documents


def learn_documents(
    session: Session, documents: list[Document], state: Path, *, lock: StateLock, opts: Options
) -> LearnOutcome:
    """Learn ``documents`` (a progress bar on a terminal, a line per document when piped) and save the
    state with the lock held."""
    from continual_transformer.session import ALREADY_LEARNED

    rows, skipped = [], []
    with progress_bar(opts) as bar:
        task = bar.add_task(f"learning with {session.strategy.name}", total=len(documents))
        for doc in documents:
            report = session.learn(doc)
            bar.advance(task)
            if ALREADY_LEARNED in report.extra:
                skipped.append(
                    f"{doc.id}: already learned as {report.extra[ALREADY_LEARNED]}, not learned again"
                )
                continue
            row = {
                "document": doc.id,
                "tokens": report.tokens,
                "loss_before": report.loss_before,
                "loss_after": report.loss_after,
                "seconds": round(report.seconds, 3),
            }
            rows.append(row)
            if not console.is_terminal and not opts.json:
                say(f"learned {doc.id}: {report.tokens} tokens in {report.seconds:.1f}s")
    session.save(state, lock=lock)
    return LearnOutcome(rows=rows, skipped=skipped, total=len(session.history))


def print_learned(outcome: LearnOutcome, session: Session, state: Path, opts: Options) -> None:
    if opts.json:
        emit_json(
            {
                "strategy": session.strategy.name,
                "learned": outcome.rows,
                "skipped": outcome.skipped,
                "state": str(state),
                "documents_total": outcome.total,
            }
        )
        return
    if outcome.rows:
        table = Table(title=f"learned with {session.strategy.name}")
        for column in ("document", "tokens", "loss before", "loss after", "seconds"):
            table.add_column(column, justify="left" if column == "document" else "right")
        for row in outcome.rows:
            table.add_row(
                row["document"],
                str(row["tokens"]),
                num(row["loss_before"]),
                num(row["loss_after"]),
                f"{row['seconds']:.1f}",
            )
        console.print(table)
    for line in outcome.skipped:
        say(line)
    say(f"state saved to {state} ({outcome.total} documents learned in total)")


def state_summary(
    *, strategy: str, model: str, history: list[dict[str, Any]], state: Path | None
) -> dict[str, Any]:
    return {
        "state": str(state) if state is not None else None,
        "strategy": strategy,
        "model": model,
        "documents": len(history),
        "tokens": sum(int(h.get("tokens") or 0) for h in history),
        "history": history,
    }


def print_state(summary: dict[str, Any], opts: Options) -> None:
    if opts.json:
        emit_json(summary)
        return
    say(f"state:     {summary['state'] or '(in memory)'}")
    say(f"strategy:  {summary['strategy']}")
    say(f"model:     {summary['model']}")
    say(f"documents: {summary['documents']} ({summary['tokens']} tokens)")
    if summary["history"]:
        print_history(summary["history"], Options())


def print_history(history: list[dict[str, Any]], opts: Options) -> None:
    if opts.json:
        emit_json(history)
        return
    if not history:
        say("nothing learned yet")
        return
    table = Table(title="learning history")
    for column in ("document", "file", "tokens", "loss before", "loss after", "seconds", "learned at"):
        table.add_column(
            column, overflow="fold", justify="right" if column in ("tokens", "seconds") else "left"
        )
    for h in history:
        table.add_row(
            str(h.get("doc_id")),
            str(h.get("source") or "(text)"),
            str(h.get("tokens", "-")),
            num(h.get("loss_before")),
            num(h.get("loss_after")),
            num(h.get("seconds"), ".1f"),
            str(h.get("learned_at", "-")),
        )
    console.print(table)


def print_info(session: Session, opts: Options) -> None:
    from continual_transformer.workbench import model_info

    info = model_info(session)
    if opts.json:
        emit_json(info.to_dict())
        return
    table = Table(title=f"{info.model} with {info.strategy}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    modified = ", ".join(map(str, info.layers_modified)) if info.layers_modified else "none"
    rows = [
        ("device, dtype", f"{info.device}, {info.dtype}"),
        ("layers total", str(info.layers_total)),
        ("layers modified", f"{len(info.layers_modified)} ({modified})"),
        ("layers frozen", str(info.layers_frozen)),
        ("parameters total", f"{info.params_total:,}"),
        ("parameters trainable", f"{info.params_trainable:,}"),
        ("parameters added", f"{info.params_added:,}"),
        ("state size", human_bytes(info.state_bytes)),
        ("documents learned", str(info.documents)),
        ("calibration", info.calibration or "none (this strategy does not calibrate)"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)


def print_forgetting(session: Session, opts: Options) -> None:
    from continual_transformer.workbench import forgetting_now

    start = time.perf_counter()
    with _spinner("measuring general-text perplexity and known facts, state on and off...", opts):
        result = forgetting_now(session)
    if opts.json:
        emit_json({**result.to_dict(), "seconds": time.perf_counter() - start})
        return
    say(f"strategy {session.strategy.name}, {len(session.history)} documents learned")
    say(
        f"general-text perplexity ({result.general_source}): {result.ppl_base:.2f} base -> "
        f"{result.ppl_now:.2f} now ({result.ppl_change:+.1%})"
    )
    say(f"general facts the base model knew: {result.known_facts_kept}/{result.known_facts} kept")


def _spinner(message: str, opts: Options):
    from continual_transformer.cli.common import status

    return status(message, opts)


def write_state(session: Session, state: Path, lock_timeout: float = 120.0) -> None:
    from continual_transformer.locking import StateLock

    with StateLock(state, timeout=lock_timeout) as lock:
        session.save(state, lock=lock)


def run_action(session: Session, name: str, state: Path | None, opts: Options) -> Any:
    from continual_transformer.workbench import strategy_actions

    actions = strategy_actions(session.strategy)
    if name not in actions:
        known = ", ".join(actions) or "none"
        raise UsageError(f"strategy {session.strategy.name} has no action {name!r} (its actions: {known})")
    action = actions[name]
    result = action.run(session)
    if action.changes_state and state is not None:
        write_state(session, state)
    if opts.json:
        emit_json({"action": name, "result": result})
    elif isinstance(result, str):
        say(result)
    else:
        for key, value in (result or {}).items():
            say(f"{key}: {value}")
    return result


def save_checkpoint(session: Session, checkpoints: Path, name: str, opts: Options) -> Path:
    _check_name(name)
    path = checkpoints / name
    from continual_transformer.locking import StateLock

    with StateLock(path) as lock:
        session.save(path, lock=lock)
    if opts.json:
        emit_json({"saved": str(path), "documents": len(session.history)})
    else:
        say(f"checkpoint {name} saved to {path} ({len(session.history)} documents)")
    return path


def load_checkpoint_session(opts: Options, checkpoints: Path, name: str, current: Session | None) -> Session:
    """The session of checkpoint ``name`` (its config and strategy), reusing ``current``'s loaded model when
    it is the same base model."""
    from continual_transformer.session import Session, checkpoint_config

    _check_name(name)
    path = checkpoints / name
    if not (path / "manifest.json").is_file():
        raise UsageError(f"no checkpoint {name!r} in {checkpoints} (see: ctt checkpoints list)")
    config, _ = checkpoint_config(path)
    if current is not None and current.backbone.name == config.model.name:
        current.strategy.close()
        current._drop_tasks()
        session = Session(config, backbone=current.backbone)
        session.load(path)
        return session
    from continual_transformer.cli.common import quiet_transformers, status

    quiet_transformers(opts)
    with status(f"loading {config.model.name}...", opts):
        return Session.from_checkpoint(path)


def list_checkpoints(checkpoints: Path, opts: Options) -> list[dict[str, Any]]:
    from continual_transformer.workbench import list_checkpoints as rows_of

    rows = [row.to_dict() for row in rows_of(checkpoints)]
    if opts.json:
        emit_json(rows)
        return rows
    if not rows:
        say(f"no checkpoints in {checkpoints}")
        return rows
    table = Table(title=f"checkpoints in {checkpoints}")
    for column in ("name", "strategy", "documents", "model", "saved"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["strategy"], str(row["documents"]), row["model"], str(row["saved_at"]))
    console.print(table)
    return rows


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise UsageError(f"checkpoint name {name!r}: give a plain name (no slashes, not starting with '.')")


# -- commands ------------------------------------------------------------------------------------------------
def learn(
    ctx: typer.Context,
    paths: Annotated[
        list[str], typer.Argument(help="Files (.txt, .md, .jsonl) or directories to learn; - reads stdin.")
    ],
    state: StateOption = DEFAULT_STATE,
    reset: Annotated[
        bool,
        typer.Option(help="Start the state over (discarding what it learned), e.g. to change --strategy."),
    ] = False,
    lock_timeout: LockTimeoutOption = 120.0,
) -> None:
    """Learn documents and save the state (loading it first if it exists). Documents already learned are
    not learned again."""
    from continual_transformer.checkpoint import recover, state_kind
    from continual_transformer.locking import StateLock

    opts = options(ctx)
    state_kind(state)  # a file or a directory of other files is refused before any work
    cfg = opts.config(state, reset=reset)  # read again under the lock; this one reads the documents
    documents = read_inputs(paths, cfg.documents)
    with StateLock(state, timeout=lock_timeout) as lock:
        recover(state)
        session = build_session(opts, state, reset=reset)
        outcome = learn_documents(session, documents, state, lock=lock, opts=opts)
    print_learned(outcome, session, state, opts)


def ask(
    ctx: typer.Context,
    question: Annotated[str, typer.Argument(help="The question; - reads it from stdin.")],
    state: StateOption = DEFAULT_STATE,
    allow_empty: AllowEmptyOption = False,
) -> None:
    """Answer a question with what has been learned."""
    from continual_transformer.session import InputError

    opts = options(ctx)
    question = read_text_argument(question, "the question").strip() if question == "-" else question
    if not question.strip():
        raise InputError("the question is empty")
    session = build_session(opts, state, allow_empty=allow_empty)
    start = time.perf_counter()
    answer = session.ask(question)
    if opts.json:
        emit_json(
            {
                "question": question,
                "answer": answer,
                "strategy": session.strategy.name,
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
    else:
        say(answer)


def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="Prompt text; - reads it from stdin.")],
    state: StateOption = DEFAULT_STATE,
    chat: Annotated[bool, typer.Option(help="Apply the chat template.")] = False,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens to generate.")] = None,
    allow_empty: AllowEmptyOption = False,
) -> None:
    """Continue a prompt (raw text by default)."""
    opts = options(ctx)
    prompt = read_text_argument(prompt, "the prompt")
    session = build_session(opts, state, allow_empty=allow_empty)
    text = session.generate([prompt], chat=chat, max_new_tokens=max_new_tokens)[0]
    if opts.json:
        emit_json({"prompt": prompt, "text": text})
    else:
        say(text)


state_app = typer.Typer(help="The learned state: show it.", no_args_is_help=True)


@state_app.command("show")
def state_show(ctx: typer.Context, state: StateOption = DEFAULT_STATE) -> None:
    """Strategy, model, documents and learning history of a state directory (reads its manifest only)."""
    from continual_transformer.checkpoint import prepare_read, read_manifest

    opts = options(ctx)
    if prepare_read(state) != "checkpoint":
        summary = state_summary(strategy=opts.config().strategy, model="-", history=[], state=state)
        summary["empty"] = True
    else:
        manifest = read_manifest(state)
        summary = state_summary(
            strategy=str(manifest.get("strategy")),
            model=str((manifest.get("base_model") or {}).get("name")),
            history=list(manifest.get("history") or []),
            state=state,
        )
    print_state(summary, opts)


def history(ctx: typer.Context, state: StateOption = DEFAULT_STATE) -> None:
    """Learning history: file, tokens, loss before / after, seconds, when."""
    from continual_transformer.checkpoint import prepare_read, read_manifest

    opts = options(ctx)
    entries = list(read_manifest(state).get("history") or []) if prepare_read(state) == "checkpoint" else []
    print_history(entries, opts)


def info(ctx: typer.Context, state: StateOption = DEFAULT_STATE) -> None:
    """Model info: layers total / modified / frozen, parameters total / trainable / added, state size,
    calibration state."""
    opts = options(ctx)
    print_info(build_session(opts, state), opts)


def forgetting(ctx: typer.Context, state: StateOption = DEFAULT_STATE) -> None:
    """What learning has cost so far: general-text perplexity and general facts kept, state on vs off."""
    opts = options(ctx)
    print_forgetting(build_session(opts, state), opts)


def forget(
    ctx: typer.Context,
    doc_id: Annotated[str, typer.Argument(help="Id of a learned document (see ctt state show).")],
    state: StateOption = DEFAULT_STATE,
    lock_timeout: LockTimeoutOption = 120.0,
) -> None:
    """Forget one document: the state is reset and the other documents relearned from their files."""
    from continual_transformer.locking import StateLock
    from continual_transformer.workbench import forget as forget_document

    opts = options(ctx)
    with StateLock(state, timeout=lock_timeout) as lock:
        session = build_session(opts, state, allow_empty=False)
        relearned = forget_document(session, doc_id)
        session.save(state, lock=lock)
    if opts.json:
        emit_json({"forgotten": doc_id, "relearned": relearned, "documents_total": len(session.history)})
    else:
        say(
            f"forgot {doc_id}; relearned {len(relearned)} other documents "
            f"({len(session.history)} in the state)"
        )


def reset_command(
    ctx: typer.Context,
    state: StateOption = DEFAULT_STATE,
    lock_timeout: LockTimeoutOption = 120.0,
) -> None:
    """Forget everything learned (the state directory keeps its strategy and config)."""
    from continual_transformer.locking import StateLock

    opts = options(ctx)
    with StateLock(state, timeout=lock_timeout) as lock:
        session = build_session(opts, state, allow_empty=False)
        before = len(session.history)
        session.reset()
        session.save(state, lock=lock)
    if opts.json:
        emit_json({"reset": str(state), "forgotten": before})
    else:
        say(f"reset {state}: {before} documents forgotten")


def use(
    ctx: typer.Context,
    strategy: Annotated[str, typer.Argument(help="Strategy to switch the state to (see ctt strategies).")],
    state: StateOption = DEFAULT_STATE,
    relearn: Annotated[
        bool, typer.Option(help="Learn the state's documents again with the new strategy, from their files.")
    ] = True,
    lock_timeout: LockTimeoutOption = 120.0,
) -> None:
    """Switch the state to another strategy, relearning its documents from their files."""
    from continual_transformer.checkpoint import prepare_read
    from continual_transformer.locking import StateLock
    from continual_transformer.workbench import switch_strategy

    opts = options(ctx)
    with StateLock(state, timeout=lock_timeout) as lock:
        exists = prepare_read(state) == "checkpoint"
        session = build_session(opts, state if exists else None)
        new, missing = switch_strategy(session, strategy, relearn=relearn)
        new.save(state, lock=lock)
    print_switched(new, missing, opts)


def print_switched(session: Session, missing: list[str], opts: Options) -> None:
    if opts.json:
        emit_json(
            {"strategy": session.strategy.name, "relearned": len(session.history), "not_relearned": missing}
        )
        return
    say(f"strategy is now {session.strategy.name}; {len(session.history)} documents relearned")
    if missing:
        say(f"not relearned (no readable source file): {', '.join(missing)}")


def action(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Action to run; without it, list the actions.")] = None,
    state: StateOption = DEFAULT_STATE,
) -> None:
    """Per-strategy actions (e.g. ttt / memory_layer calibration): list them, or run one."""
    from continual_transformer.workbench import strategy_actions

    opts = options(ctx)
    session = build_session(opts, state)
    if name is None:
        actions = strategy_actions(session.strategy)
        if opts.json:
            emit_json({n: a.help for n, a in actions.items()})
        elif not actions:
            say(f"strategy {session.strategy.name} has no actions")
        else:
            for n, a in actions.items():
                say(f"{n}: {a.help}")
        return
    run_action(session, name, state, opts)


checkpoints_app = typer.Typer(help="Named checkpoints of the state: list, save, load.", no_args_is_help=True)


@checkpoints_app.command("list")
def checkpoints_list(ctx: typer.Context, checkpoints: CheckpointsOption = DEFAULT_CHECKPOINTS) -> None:
    """The named checkpoints: strategy, documents, model, when."""
    list_checkpoints(checkpoints, options(ctx))


@checkpoints_app.command("save")
def checkpoints_save(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Checkpoint name.")],
    state: StateOption = DEFAULT_STATE,
    checkpoints: CheckpointsOption = DEFAULT_CHECKPOINTS,
) -> None:
    """Save the state as a named checkpoint."""
    opts = options(ctx)
    save_checkpoint(build_session(opts, state, allow_empty=False), checkpoints, name, opts)


@checkpoints_app.command("load")
def checkpoints_load(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Checkpoint name (see ctt checkpoints list).")],
    state: StateOption = DEFAULT_STATE,
    checkpoints: CheckpointsOption = DEFAULT_CHECKPOINTS,
    lock_timeout: LockTimeoutOption = 120.0,
) -> None:
    """Make a named checkpoint the state (what the state held is replaced)."""
    from continual_transformer.checkpoint import state_kind
    from continual_transformer.locking import StateLock

    opts = options(ctx)
    state_kind(state)
    session = load_checkpoint_session(opts, checkpoints, name, None)
    with StateLock(state, timeout=lock_timeout) as lock:
        session.save(state, lock=lock)
    if opts.json:
        emit_json({"loaded": name, "state": str(state), "documents": len(session.history)})
    else:
        say(
            f"checkpoint {name} loaded into {state} "
            f"({session.strategy.name}, {len(session.history)} documents)"
        )
