"""Knowledge results against the number of documents learned: acquisition (and × oracle), general perplexity
change and known-fact forgetting per strategy, from several ``ctt bench knowledge`` result directories.

    python benchmarks/knowledge_scaling.py RESULTS_DIR... --out benchmarks/results/knowledge/scaling

Rows are grouped by benchmark, strategy and number of documents; a run that learned each stream batch in one
training run (``--learn-together``) is its own row, "STRATEGY (together)". "× oracle" divides by the
``oracle`` row of the same benchmark and number of documents (from any of the directories). Writes
``scaling.json``, ``scaling.md`` and ``scaling.png`` (one panel per measure, one line per strategy,
documents on a log axis).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MEASURES = (
    ("acquisition_contains", "acquisition (contains)"),
    ("ppl_change", "general perplexity change"),
    ("known_fact_forgetting_ratio", "known-fact forgetting"),
)


def collect(dirs: list[Path]) -> list[dict]:
    """One record per (benchmark, docs, strategy); a later directory replaces an earlier record."""
    records: dict[tuple[str, int, str], dict] = {}
    for path in dirs:
        results = json.loads((path / "results.json" if path.is_dir() else path).read_text(encoding="utf-8"))
        bench = results["meta"]["settings"]["bench"]
        together = bool(bench.get("learn_together"))
        for name, row in results["strategies"].items():
            if together and name != "oracle":  # another stream: each batch learned in one run
                name = f"{name} (together)"
            key = (bench["benchmark"], int(bench["docs"]), name)
            records[key] = {
                "benchmark": key[0],
                "docs": key[1],
                "strategy": name,
                "source": str(path),
                "device": results["meta"].get("device", ""),
                "first_batch_retention": row.get("first_batch_retention"),
                "learn_s_per_1k_tokens": row.get("learn_s_per_1k_tokens"),
                **{m: row.get(m) for m, _ in MEASURES},
            }
    oracle = {
        (r["benchmark"], r["docs"]): r["acquisition_contains"]
        for r in records.values()
        if r["strategy"] == "oracle"
    }
    for r in records.values():
        ceiling = oracle.get((r["benchmark"], r["docs"]))
        r["x_oracle"] = r["acquisition_contains"] / ceiling if ceiling else None
    return sorted(records.values(), key=lambda r: (r["benchmark"], r["strategy"], r["docs"]))


def fmt(value, pattern: str) -> str:
    return "–" if value is None else format(value, pattern)


def markdown(records: list[dict]) -> str:
    lines = [
        "# Knowledge against the number of documents",
        "",
        "| benchmark | strategy | docs | acq. contains | × oracle | general PPL change "
        "| known-fact forgetting "
        "| first-batch retention | learn s/1k tok |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['benchmark']} | `{r['strategy']}` | {r['docs']} | {fmt(r['acquisition_contains'], '.3f')} "
            f"| {fmt(r['x_oracle'], '.2f')} | {fmt(r['ppl_change'] and 100 * r['ppl_change'], '+.1f')}% "
            f"| {fmt(r['known_fact_forgetting_ratio'], '.3f')} | {fmt(r['first_batch_retention'], '.3f')} "
            f"| {fmt(r['learn_s_per_1k_tokens'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MEASURES), figsize=(5 * len(MEASURES) + 4, 4.5))
    series: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        series.setdefault((r["benchmark"], r["strategy"]), []).append(r)
    markers = {"novel_facts": "o", "news": "s"}
    for ax, (measure, title) in zip(axes, MEASURES):
        for (benchmark, strategy), rows in sorted(series.items()):
            rows = [r for r in rows if r[measure] is not None]
            if rows:
                ax.plot(
                    [r["docs"] for r in rows],
                    [r[measure] for r in rows],
                    marker=markers.get(benchmark, "^"),
                    label=f"{strategy} ({benchmark})",
                )
        ax.set_xscale("log")
        ax.set_xlabel("documents learned")
        ax.set_title(title)
    # a broken model's perplexity change (x 10^5) would flatten every other line: a symmetric log axis
    axes[[m for m, _ in MEASURES].index("ppl_change")].set_yscale("symlog", linthresh=0.1)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    records = collect(args.dirs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    (args.out / "scaling.md").write_text(markdown(records), encoding="utf-8")
    plot(records, args.out / "scaling.png")
    print(markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
