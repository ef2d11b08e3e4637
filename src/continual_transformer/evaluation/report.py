"""Writing results: ``results.json``, a markdown table and plots, into a results directory."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from continual_transformer.errors import ContinualTransformerError

ORACLE = "oracle"
"""Name of the ceiling row of knowledge results: every probe answered with only its own document in the
prompt."""
ORACLE_COLUMN = "× oracle"
MISSING = "–"
"""The × oracle cell of results without an oracle row (measured before it existed) or with a zero oracle."""


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (temp file + rename); NaN becomes null so every JSON reader accepts it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(_clean(data), handle, indent=2)
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return format(value, spec)


KNOWLEDGE_COLUMNS: Sequence[tuple[str, str, str]] = (
    ("acquisition_em", "acq. EM", ".3f"),
    ("acquisition_contains", "acq. contains", ".3f"),
    ("acquisition_cloze_contains", "cloze", ".3f"),
    ("acquisition_qa_contains", "QA", ".3f"),
    ("ppl_change", "general PPL change", "+.1%"),
    ("known_fact_forgetting_ratio", "known-fact forgetting", ".3f"),
    ("stream_avg_accuracy", "stream avg acc.", ".3f"),
    ("stream_bwt", "stream BWT", "+.3f"),
    ("learn_s_per_1k_tokens", "learn s/1k tok", ".2f"),
    ("answer_latency_s", "answer latency s", ".3f"),
    ("peak_memory_mb", "peak MB", ".0f"),
    ("params_added", "params added", ""),
    ("state_bytes_per_doc", "state bytes/doc", ",.0f"),
)


def oracle_ratio(results: dict[str, Any], name: str, key: str = "acquisition_contains") -> float | None:
    """``key`` of row ``name`` over the oracle row's: the share of the ceiling a strategy reaches.

    ``None`` when the results have no oracle row, either value is missing, or the oracle's is 0.
    """
    rows = results["strategies"]
    oracle = rows.get(ORACLE, {}).get(key)
    value = rows.get(name, {}).get(key)
    if not _number(oracle) or not _number(value) or oracle == 0:
        return None
    return value / oracle


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


def fmt_oracle_ratio(results: dict[str, Any], name: str) -> str:
    """The "× oracle" cell of row ``name``: acquisition over the oracle's, e.g. ``0.62``, or ``–``."""
    ratio = oracle_ratio(results, name)
    return MISSING if ratio is None else f"{ratio:.2f}"


def knowledge_markdown(results: dict[str, Any]) -> str:
    meta, bench = results["meta"], results["benchmark"]
    settings = meta["settings"]["bench"]
    lines = [
        f"# Knowledge benchmark: {bench['name']}",
        "",
        f"- model: `{meta['model']}` on `{meta['device']}`"
        + (
            f" ({meta['machine'].get('gpu')})"
            if meta["machine"].get("gpu")
            else f" ({meta['machine']['cpu_count']} CPU cores)"
        ),
        f"- {bench['documents']} documents, {bench['probes']} probes ({bench['cloze']} cloze, "
        f"{bench['qa']} questions), learned in {settings['stream_batches']} batches"
        + (" (each batch in one training run)" if settings.get("learn_together") else "")
        + f"; seed {settings['seed']}",
        f"- general ability: perplexity on {settings['ppl_tokens']:,} tokens of "
        f"{meta['settings']['general_text']}; {bench['known_facts_kept']}/{bench['known_facts_asked']} "
        "known-fact probes answered correctly by the base model",
        f"- library {meta['version']}, torch {meta['machine']['torch']}, {meta['date']}",
        *([f"- note: {meta['notes']}"] if meta.get("notes") else []),
        "",
        "| " + " | ".join(knowledge_header()) + " |",
        "|---|" + "---:|" * (len(knowledge_header()) - 1),
    ]
    for name in results["strategies"]:
        lines.append("| " + " | ".join(knowledge_cells(results, name)) + " |")
    lines += [
        "",
        "acq. = closed-book accuracy on a batch's probes right after learning it (EM: normalised first "
        "answer span; contains: the answer appears as whole words). Known-fact forgetting = (before - after) "
        "/ before on general facts the base model knew. Stream BWT: accuracy on earlier batches at the end "
        "minus right after learning them.",
        "",
        f"`{ORACLE}`: every probe answered with only its own document in the prompt (in_context's prompt "
        "format), nothing learned. By construction, not measured: its accuracy matrix repeats each batch's "
        "accuracy (nothing learned, nothing forgotten), and its perplexity and known facts are the base "
        f"model's (no document is in the prompt for general text). {ORACLE_COLUMN} = acq. contains / the "
        f"oracle's acq. contains ({MISSING}: no oracle row in these results).",
    ]
    return "\n".join(lines) + "\n"


def knowledge_header() -> list[str]:
    """Column titles of the knowledge table: the strategy, then :data:`KNOWLEDGE_COLUMNS` with × oracle after
    acquisition."""
    titles = [title for _, title, _ in KNOWLEDGE_COLUMNS]
    at = [key for key, _, _ in KNOWLEDGE_COLUMNS].index("acquisition_contains") + 1
    return ["strategy", *titles[:at], ORACLE_COLUMN, *titles[at:]]


def knowledge_cells(results: dict[str, Any], name: str) -> list[str]:
    """One row of the knowledge table, in :func:`knowledge_header`'s order."""
    row = results["strategies"][name]
    cells = [fmt(row.get(key), spec) if spec else fmt(row.get(key)) for key, _, spec in KNOWLEDGE_COLUMNS]
    at = [key for key, _, _ in KNOWLEDGE_COLUMNS].index("acquisition_contains") + 1
    return [f"`{name}`", *cells[:at], fmt_oracle_ratio(results, name), *cells[at:]]


def knowledge_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    names = list(results["strategies"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        R = np.array(
            [
                [np.nan if v is None else v for v in row]
                for row in results["strategies"][name]["accuracy_matrix"]
            ]
        )
        im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("batch k (probes)")
        ax.set_ylabel("after learning batch t")
        for (t, k), value in np.ndenumerate(R):
            if not np.isnan(value):
                ax.text(
                    k,
                    t,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="w" if value < 0.6 else "k",
                )
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle("accuracy matrix R[t, k] (contains)")
    path = out_dir / "accuracy_matrix.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(5, 4))
    ceiling = results["strategies"].get(ORACLE, {}).get("acquisition_contains")
    if _number(ceiling):
        ax.axhline(ceiling, color="0.4", linestyle="--", linewidth=1)
        ax.annotate(
            f"{ORACLE} (own document in the prompt)",
            (1, ceiling),
            xycoords=("axes fraction", "data"),
            textcoords="offset points",
            xytext=(-4, 4),
            ha="right",
            fontsize=8,
            color="0.3",
        )
    for name in names:
        if name == ORACLE:
            continue
        row = results["strategies"][name]
        x = row.get("known_fact_forgetting_ratio")
        y = row.get("acquisition_contains")
        if x is None or y is None or (isinstance(x, float) and math.isnan(x)):
            continue
        ax.scatter(x, y, s=40)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("known-fact forgetting ratio (lower is better)")
    ax.set_ylabel("acquisition (contains)")
    ax.set_xlim(left=-0.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    path = out_dir / "acquisition_vs_forgetting.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    paths.append(path)
    return paths


LEARNING_SETTINGS = ("learn_together",)
"""Benchmark settings that change only how strategies learn: rows of strategies that learn nothing
(``oracle``, ``none``) are the same whatever their values."""


def read_knowledge_results(path: Path, model: str, bench: dict, *, ignore: Sequence[str] = ()) -> dict:
    """An earlier run's results to add rows to; refused when it measured another model or profile (settings
    named in ``ignore`` aside). Settings either side was written without read as their defaults."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        settings = earlier["meta"]["settings"]["bench"]
        earlier_model = earlier["meta"]["model"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ContinualTransformerError(
            f"{path} is not a knowledge benchmark result ({exc}); use another --out"
        ) from exc
    from continual_transformer.evaluation.knowledge import KnowledgeBenchConfig

    defaults = dataclasses.asdict(KnowledgeBenchConfig())  # settings added later read as their defaults

    def compared(values: dict) -> dict:
        return {k: v for k, v in {**defaults, **values}.items() if k not in ignore}

    if compared(settings) != compared(bench) or earlier_model != model:
        raise ContinualTransformerError(
            f"{path} was measured with other settings or another model ({earlier_model}, {settings}); "
            "rows can only be added to a run of the same profile: use another --out"
        )
    return earlier


def write_knowledge_results(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results)
    (out_dir / "results.md").write_text(knowledge_markdown(results), encoding="utf-8")
    return [out_dir / "results.json", out_dir / "results.md", *knowledge_plots(results, out_dir)]
