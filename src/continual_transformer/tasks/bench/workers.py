"""Methods of one benchmark side by side, one process each (``concurrent.futures`` with ``spawn``).

A model this small leaves a GPU mostly idle, bound by kernel launches, so several methods sharing it finish
several times sooner. Each process loads the model again by name and runs one method (:func:`run_spec`); what
travels between processes is plain JSON-able data (the spec in, the summary out), never a model or tensors.
Each method's log and progress bars go to ``log_dir/<method>.log``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from continual_transformer.backbone import Backbone
from continual_transformer.config import from_dict, to_dict
from continual_transformer.tasks.config import TaskBenchmarkSettings

logger = logging.getLogger(__name__)


def run_in_workers(
    backbone: Backbone,
    suite: str,
    methods: Sequence[str],
    settings: TaskBenchmarkSettings,
    baseline: Sequence[float],
    workers: int,
    log_dir: Path,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run each method in a fresh process, ``workers`` at a time; ``{method: summary}`` in ``methods`` order.

    ``progress(method, summary)`` is called in this process as each finishes. When one fails, the methods not
    started are cancelled, the running ones stopped, and a RuntimeError carries the tail of its log.
    """
    from tqdm.auto import tqdm

    from continual_transformer.tasks.bench.runner import nan_matrix

    log_dir.mkdir(parents=True, exist_ok=True)
    model = {
        "name": backbone.name,
        "device": str(backbone.device),
        "dtype": str(backbone.dtype).removeprefix("torch."),
    }
    specs = {
        method: {
            "model": model,
            "suite": suite,
            "settings": to_dict(settings),
            "method": method,
            "baseline": list(baseline),
        }
        for method in methods
    }
    # Each worker's host side gets its share of the cores: N workers x all-cores thread pools thrash the CPUs.
    threads = max(1, (os.cpu_count() or 1) // workers)
    results: dict[str, dict[str, Any]] = {}
    executor = cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_prepare_worker,
        initargs=(threads,),
        max_tasks_per_child=1,  # a fresh process per method: each starts from the same clean state
    )
    with executor, tqdm(total=len(methods), desc=f"{suite} ({workers} workers)", disable=None) as bar:
        futures = {
            executor.submit(_run_logged, spec, str(log_dir / f"{method}.log")): method
            for method, spec in specs.items()
        }
        for future in cf.as_completed(futures):
            method = futures[future]
            try:
                results[method] = future.result()
            except BaseException as exc:
                _stop(executor)
                log = log_dir / f"{method}.log"
                tail = log.read_text(encoding="utf-8")[-3000:] if log.exists() else ""
                raise RuntimeError(f"method {method} failed ({exc!r}); log tail:\n{tail}") from exc
            logger.info("%s finished", method)
            bar.update(1)
            if progress is not None:
                progress(method, results[method])
    return {method: nan_matrix(results[method]) for method in methods}


def _stop(executor: cf.ProcessPoolExecutor) -> None:
    """Cancel the methods not started and end the running ones (the executor would otherwise wait for
    them)."""
    executor.shutdown(wait=False, cancel_futures=True)
    terminate = getattr(executor, "terminate_workers", None)  # Python 3.14+
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(executor, "_processes", None) or {}).values()):
        process.terminate()


def _prepare_worker(threads: int) -> None:
    """Process set-up, before any model is loaded: threads, and the allocator for several processes per
    GPU."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _run_logged(spec: dict[str, Any], log_path: str) -> dict[str, Any]:
    """:func:`run_spec` with this process's log records, warnings and progress bars written to
    ``log_path``."""
    with _log_to(Path(log_path)):
        return run_spec(spec)


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    with open(path, "w", encoding="utf-8") as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        level = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                yield
        finally:
            root.removeHandler(handler)
            root.setLevel(level)


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """What one worker does: load the model named in ``spec``, run one method, return its summary.

    ``spec`` holds ``model`` (name, device, dtype), ``suite``, ``settings`` (a :class:`TaskBenchmarkSettings`
    as a dict), ``method`` and ``baseline`` (the zero-shot accuracies measured once by the parent).
    """
    from continual_transformer.config import ModelConfig
    from continual_transformer.tasks.bench.runner import run_method, suite_tasks
    from continual_transformer.tasks.training import seeded

    settings = from_dict(TaskBenchmarkSettings, spec["settings"], "bench")
    # As in a single-process run: the global generator (model loading, peft's initialisation) seeded, then
    # restored.
    with seeded(settings.learner.seed, spec["model"]["device"]):
        backbone = Backbone.load(ModelConfig(**spec["model"]))
        tasks = suite_tasks(spec["suite"], settings)
        return run_method(backbone, tasks, spec["method"], settings, spec["baseline"], suite=spec["suite"])
