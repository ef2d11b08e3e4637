"""Task commands: learn a classification task, predict a label, evaluate, on the session's task learner
(:meth:`Session.learn_task`, :meth:`Session.predict`, :meth:`Session.evaluate`). Tasks are saved in the
same state directory as the documents (their own checkpoint part)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from continual_transformer.cli.common import (
    DEFAULT_STATE,
    StateOption,
    build_session,
    console,
    emit_json,
    options,
    read_text_argument,
    say,
)

if TYPE_CHECKING:
    from continual_transformer.tasks import TaskReport

tasks_app = typer.Typer(
    help="Task-incremental classification: learn a task, predict, evaluate.", no_args_is_help=True
)


@tasks_app.command("learn")
def tasks_learn(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Task id.")],
    data: Annotated[Path, typer.Argument(help="Labelled examples: .jsonl / .csv / .json (text, label).")],
    state: StateOption = DEFAULT_STATE,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: the task config's).")] = None,
    lock_timeout: Annotated[float, typer.Option(help="Seconds to wait for the state's lock.")] = 120.0,
) -> None:
    """Learn (or keep learning) a classification task from labelled examples; saved with the state."""
    from continual_transformer.locking import StateLock

    opts = options(ctx)
    with StateLock(state, timeout=lock_timeout) as lock:
        session = build_session(opts, state)
        report = session.learn_task(name, str(data), epochs)
        session.save(state, lock=lock)
    tasks = list(session.tasks.tasks)
    if opts.json:
        emit_json({"task": name, "report": _report_dict(report), "tasks": [str(t) for t in tasks]})
    else:
        say(f"learned task {name} ({len(tasks)} tasks in {state}): {_summary(report)}")


@tasks_app.command("predict")
def tasks_predict(
    ctx: typer.Context,
    text: Annotated[str, typer.Argument(help="Text to classify; - reads stdin.")],
    task: Annotated[str | None, typer.Option(help="Task id (default: the router picks the task).")] = None,
    state: StateOption = DEFAULT_STATE,
) -> None:
    """The label of a text (routed to a task when --task is not given)."""
    opts = options(ctx)
    text = read_text_argument(text, "the text")
    session = build_session(opts, state, allow_empty=False)
    label = session.predict(text, task)
    if opts.json:
        emit_json({"text": text, "task": task, "label": label})
    else:
        say(label)


@tasks_app.command("evaluate")
def tasks_evaluate(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Task id.")],
    data: Annotated[Path, typer.Argument(help="Labelled examples to score.")],
    state: StateOption = DEFAULT_STATE,
    routed: Annotated[bool, typer.Option(help="Predict without the task id (the router picks).")] = False,
) -> None:
    """Accuracy on labelled examples for a learned task."""
    opts = options(ctx)
    session = build_session(opts, state, allow_empty=False)
    accuracy = session.tasks.evaluate(name, str(data), routed=routed)
    if opts.json:
        emit_json({"task": name, "accuracy": accuracy, "routed": routed})
    else:
        say(f"accuracy on {name}: {accuracy:.3f}" + (" (routed)" if routed else ""))


@tasks_app.command("list")
def tasks_list(ctx: typer.Context, state: StateOption = DEFAULT_STATE) -> None:
    """The tasks learned in the state and their labels."""
    opts = options(ctx)
    session = build_session(opts, state, allow_empty=False)
    learner = session.tasks if session.has_tasks else None
    rows = [{"task": t, "labels": list(learner.labels(t))} for t in learner.tasks] if learner else []
    if opts.json:
        emit_json(rows)
        return
    if not rows:
        say("no tasks learned")
        return
    table = Table(title="tasks")
    table.add_column("task")
    table.add_column("labels", overflow="fold")
    for row in rows:
        table.add_row(row["task"], ", ".join(row["labels"]))
    console.print(table)


def _report_dict(report: TaskReport) -> dict:
    return dataclasses.asdict(report)


def _summary(report: TaskReport) -> str:
    loss = "-" if report.final_loss is None else f"{report.final_loss:.3f}"
    return (
        f"{report.examples} examples, {len(report.labels)} labels, {report.seconds:.1f}s, final loss {loss}, "
        f"slot {report.slot}"
    )
