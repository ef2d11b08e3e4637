"""The interactive menu (``ctt`` alone on a terminal): questionary prompts, rich output.

The model is loaded once, on the first entry that needs it, and kept for the whole menu session; switching
strategy or loading a checkpoint reuses it. Every entry calls the same function as its ``ctt`` command
(:mod:`.state`, :mod:`.configure`, :mod:`.compare`), so a menu action and the command have the same effect:
learning saves the state directory, configuring writes the settings file.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import questionary

from continual_transformer.cli import state as ops
from continual_transformer.cli.common import (
    DEFAULT_CHECKPOINTS,
    Options,
    build_session,
    console,
    err_console,
    say,
)
from continual_transformer.errors import ContinualTransformerError

if TYPE_CHECKING:
    from continual_transformer.session import Session

QUIT = "quit"


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    """Shortcut key."""
    title: str
    command: str
    """The ``ctt`` command with the same effect (shown in the menu)."""
    run: Callable[[], Any]


class Menu:
    def __init__(self, opts: Options, *, state: Path, checkpoints: Path = DEFAULT_CHECKPOINTS) -> None:
        self.opts = opts
        self.state = state
        self.checkpoints = checkpoints
        self._session: Session | None = None

    # -- the session, loaded once ----------------------------------------------------------------------------
    @property
    def session(self) -> Session:
        if self._session is None:
            self._session = build_session(self.opts, self.state)
            say(f"model {self._session.backbone.name} loaded, strategy {self._session.strategy.name}")
        return self._session

    def _rebuild(self, opts: Options) -> None:
        """A new session from ``opts`` and the state directory, reusing the loaded model when its name is
        unchanged."""
        from continual_transformer.checkpoint import prepare_read
        from continual_transformer.session import Session

        old = self._session
        self.opts = opts
        if old is None:
            return
        config = opts.config(self.state)
        if config.model.name != old.backbone.name:
            old.strategy.close()
            self._session = None
            return
        old.strategy.close()
        old._drop_tasks()
        session = Session(config, backbone=old.backbone)
        if prepare_read(self.state) == "checkpoint":
            session.load(self.state)
        self._session = session

    def _bare_backbone(self, work: Callable[[Any], Any]) -> Any:
        """Run ``work(backbone)`` on the base model (the session's strategy closed), then rebuild the session
        from the state directory."""
        session = self.session
        session.strategy.close()
        try:
            return work(session.backbone)
        finally:
            self._rebuild(self.opts)

    # -- entries ---------------------------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        return [
            Entry("c", "Chat (with what was learned)", "ctt ask ... (a loop)", self.chat),
            Entry("a", "Ask one question", "ctt ask QUESTION", self.ask_one),
            Entry("l", "Learn a document", "ctt learn FILE", self.learn_file),
            Entry("d", "Learn a directory", "ctt learn DIR", self.learn_directory),
            Entry("s", "Switch strategy", "ctt use STRATEGY", self.switch),
            Entry("x", "Strategy actions", "ctt action [NAME]", self.actions),
            Entry("b", "Run benchmarks (quick)", "ctt bench knowledge|tasks --quick", self.benchmarks),
            Entry("m", "Compare strategies", "ctt compare DOC QA.jsonl", self.compare),
            Entry("f", "Forgetting metrics", "ctt forgetting", self.forgetting),
            Entry("i", "Model info", "ctt info", self.info),
            Entry("h", "Learning history", "ctt history", self.history),
            Entry("t", "State", "ctt state show", self.show_state),
            Entry("k", "Checkpoints: save / load / list", "ctt checkpoints save|load|list", self.checkpoint),
            Entry("r", "Forget a document / reset", "ctt forget DOC_ID | ctt reset", self.forget),
            Entry("g", "Configure", "ctt config show|set", self.configure),
            Entry("q", "Quit", "", lambda: QUIT),
        ]

    def run(self) -> None:
        say(f"ctt interactive menu: state {self.state}, settings {self.opts.settings_file}")
        entries = self.entries()
        while True:
            choices = [
                questionary.Choice(
                    f"{e.title}" + (f"   ({e.command})" if e.command else ""), value=e, shortcut_key=e.key
                )
                for e in entries
            ]
            entry = questionary.select(
                "What next?", choices=choices, use_shortcuts=True, use_jk_keys=False
            ).ask()
            if entry is None or entry.key == "q":
                say("bye")
                return
            try:
                entry.run()
            except ContinualTransformerError as exc:
                err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
            except KeyboardInterrupt:
                say("(interrupted)")
            except Exception as exc:  # the menu stays up; --debug shows where it came from
                if self.opts.debug:
                    traceback.print_exc()
                err_console.print(
                    f"error: unexpected {type(exc).__name__}: {exc}",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )

    # -- answering -------------------------------------------------------------------------------------------
    def chat(self) -> None:
        session = self.session
        say("chat: an empty line or /exit goes back to the menu")
        while True:
            question = questionary.text("you>").ask()
            if question is None or not question.strip() or question.strip() == "/exit":
                return
            say(f"model> {session.ask(question)}")

    def ask_one(self) -> None:
        question = questionary.text("Question:").ask()
        if question and question.strip():
            say(f"answer: {self.session.ask(question)}")

    # -- learning --------------------------------------------------------------------------------------------
    def _learn(self, path: str) -> None:
        from continual_transformer.locking import StateLock

        session = self.session
        documents = ops.read_inputs([path], session.config.documents)
        with StateLock(self.state) as lock:
            outcome = ops.learn_documents(session, documents, self.state, lock=lock, opts=self.opts)
        ops.print_learned(outcome, session, self.state, self.opts)

    def learn_file(self) -> None:
        path = questionary.path("Document (.txt, .md, .jsonl):").ask()
        if path:
            self._learn(path.strip())

    def learn_directory(self) -> None:
        path = questionary.path("Directory:", only_directories=True).ask()
        if path:
            self._learn(path.strip())

    def switch(self) -> None:
        from continual_transformer.demo import RECOMMENDED_STRATEGY
        from continual_transformer.strategies import registry
        from continual_transformer.workbench import switch_strategy

        current = self.session.strategy.name
        choices = [
            questionary.Choice(
                name
                + (" (recommended)" if name == RECOMMENDED_STRATEGY else "")
                + (" (now)" if name == current else ""),
                value=name,
            )
            for name in registry.names()
        ]
        name = questionary.select("Strategy:", choices=choices).ask()
        if not name or name == current:
            return
        with ops._spinner(f"switching to {name} and relearning...", self.opts):
            new, missing = switch_strategy(self.session, name)
        self._session = new
        ops.write_state(new, self.state)
        ops.print_switched(new, missing, self.opts)

    def actions(self) -> None:
        from continual_transformer.workbench import strategy_actions

        actions = strategy_actions(self.session.strategy)
        if not actions:
            say(f"strategy {self.session.strategy.name} has no actions")
            return
        name = questionary.select(
            "Action:", choices=[questionary.Choice(f"{n}: {a.help}", value=n) for n, a in actions.items()]
        ).ask()
        if name:
            ops.run_action(self.session, name, self.state, self.opts)

    # -- measuring -------------------------------------------------------------------------------------------
    def benchmarks(self) -> None:
        which = questionary.select(
            "Benchmark:",
            choices=[
                questionary.Choice(
                    "knowledge, quick profile (baselines + current strategy)", value="knowledge"
                ),
                questionary.Choice("tasks, quick profile (clinc150-10)", value="tasks"),
            ],
        ).ask()
        if which == "knowledge":
            self._bare_backbone(self._knowledge_quick)
        elif which == "tasks":
            from continual_transformer.tasks.benchmark import bench_tasks

            cfg = self.session.config
            out = Path("benchmarks/results/tasks/quick-menu")
            self._bare_backbone(
                lambda backbone: bench_tasks(
                    suite="clinc150-10",
                    quick=True,
                    out=out,
                    data_dir=cfg.data_dir,
                    model=backbone,
                    seed=cfg.seed,
                    progress=lambda method, summary: say(f"  {method} done"),
                )
            )
            say(f"wrote {out}: results.json, results.md and the accuracy-matrix plots")

    def _knowledge_quick(self, backbone: Any) -> None:
        from rich.markdown import Markdown

        from continual_transformer.evaluation.knowledge import QUICK, run_knowledge_bench, with_strategies
        from continual_transformer.evaluation.report import knowledge_markdown, write_knowledge_results

        config = self.session.config
        out = Path("benchmarks/results/knowledge/quick-menu")
        names = with_strategies([config.strategy])
        results = run_knowledge_bench(
            backbone, config, names, QUICK, on_result=lambda name, row, _r: say(f"  {name} done")
        )
        paths = write_knowledge_results(results, out)
        console.print(Markdown(knowledge_markdown(results)))
        say("wrote " + ", ".join(str(p) for p in paths))

    def compare(self) -> None:
        from continual_transformer.cli.compare import comparison_table
        from continual_transformer.demo import QAPair, compare_strategies, read_qa
        from continual_transformer.strategies import registry

        document = questionary.path("Document or directory:").ask()
        if not document:
            return
        qa_file = questionary.path("Questions (JSONL; leave empty to type them):").ask()
        if qa_file:
            qa = read_qa(qa_file.strip())
        else:
            qa = []
            while True:
                line = questionary.text("question | answer (empty line ends):").ask()
                if not line or "|" not in line:
                    break
                question, answer = (part.strip() for part in line.split("|", 1))
                qa.append(QAPair(question, (answer,)))
            if not qa:
                say("no questions given")
                return
        names = questionary.checkbox(
            "Strategies:", choices=[n for n in registry.names() if n != "none"]
        ).ask()
        if not names:
            return
        documents = ops.read_inputs([document.strip()], self.session.config.documents)
        out = Path("ctt-compare")
        comparison = self._bare_backbone(
            lambda backbone: compare_strategies(backbone, self.session.config, documents, qa, names, out=out)
        )
        console.print(comparison_table(comparison))
        say(f"plots: {', '.join(str(p) for p in comparison.plots)}")

    def forgetting(self) -> None:
        ops.print_forgetting(self.session, self.opts)

    def info(self) -> None:
        ops.print_info(self.session, self.opts)

    def history(self) -> None:
        ops.print_history(self.session.history, self.opts)

    def show_state(self) -> None:
        session = self.session
        summary = ops.state_summary(
            strategy=session.strategy.name,
            model=session.backbone.name,
            history=session.history,
            state=self.state,
        )
        ops.print_state(summary, self.opts)

    # -- state -----------------------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        what = questionary.select("Checkpoints:", choices=["save", "load", "list"]).ask()
        if what == "save":
            name = questionary.text("Name:").ask()
            if name:
                ops.save_checkpoint(self.session, self.checkpoints, name.strip(), self.opts)
        elif what == "load":
            from continual_transformer.workbench import list_checkpoints

            names = [row.name for row in list_checkpoints(self.checkpoints)]
            if not names:
                say(f"no checkpoints in {self.checkpoints}")
                return
            name = questionary.select("Load:", choices=names).ask()
            if name:
                self._session = ops.load_checkpoint_session(self.opts, self.checkpoints, name, self._session)
                ops.write_state(self._session, self.state)
                say(
                    f"checkpoint {name} loaded into {self.state} "
                    f"({self._session.strategy.name}, {len(self._session.history)} documents)"
                )
        elif what == "list":
            ops.list_checkpoints(self.checkpoints, self.opts)

    def forget(self) -> None:
        from continual_transformer.workbench import forget

        session = self.session
        ids = [str(h.get("doc_id")) for h in session.history]
        if not ids:
            say("nothing learned yet")
            return
        everything = "(everything: reset)"
        choice = questionary.select("Forget:", choices=[*ids, everything]).ask()
        if choice == everything:
            if questionary.confirm(f"Forget all {len(ids)} documents?", default=False).ask():
                session.reset()
                ops.write_state(session, self.state)
                say(f"reset {self.state}: {len(ids)} documents forgotten")
        elif choice:
            relearned = forget(session, choice)
            ops.write_state(session, self.state)
            say(f"forgot {choice}; relearned {len(relearned)} other documents")

    def configure(self) -> None:
        from continual_transformer.cli.configure import read_settings, set_setting

        path = self.opts.settings_file
        settings = read_settings(path)
        say(f"settings file {path}: {settings or '(none yet: defaults apply)'}")
        say("every key and its default: ctt config show; e.g. generation.max_new_tokens=64")
        while True:
            item = questionary.text("key.path=value (empty: back):").ask()
            if not item or not item.strip():
                return
            try:
                set_setting(path, item.strip())
            except ContinualTransformerError as exc:
                err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
                continue
            say(f"saved {item.strip()} to {path}")
            self._rebuild(dataclasses.replace(self.opts, config_file=path))
            return


def run_menu(opts: Options, *, state: Path, checkpoints: Path = DEFAULT_CHECKPOINTS) -> None:
    Menu(opts, state=state, checkpoints=checkpoints).run()
