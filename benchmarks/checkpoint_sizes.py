"""Checkpoint size and write cost per strategy: bytes on disk and bytes written by each save.

For each strategy: learn a two-sentence document, save; learn one more document, save again. Reports the
bytes on disk after each save, the bytes each save wrote (new tensor files plus manifest and config), what
the trained tensors would take stored whole (the format before deltas), and whether a fresh session that
loads the checkpoint computes bit-identical logits.

A strategy that rounds what it learned to ``delta_bits`` (finetune, ttt: 8 by default) is also run with exact
deltas (``delta_bits=0``) on the same documents: the rounding's cost is the largest change of a probe logit,
next to the largest logit, and whether the greedy answers to the probes stay the same.

    PYTHONPATH=src python benchmarks/checkpoint_sizes.py --tiny
    PYTHONPATH=src python benchmarks/checkpoint_sizes.py --strategies finetune,ttt:delta_bits=4   # packaged
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DOCS = [
    "The capital of Veloria is Tarnhelm. Its river, the Orvalis, freezes every winter.",
    "The Quenmark observatory was founded in 1821. Its first director was Ilsa Marrow.",
]
PROBE = ["Tell me about Veloria and its capital city.", "Who directed the Quenmark observatory?"]


def tiny_session(spec: str):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tokenizer, fast_config, make_backbone

    from continual_transformer.evaluation.knowledge import parse_strategy_spec
    from continual_transformer.session import Session

    name, settings = parse_strategy_spec(spec)
    sections = {key: dict(section) for key, section in fast_config().strategies.items()}
    sections[name] = {**sections.get(name, {}), **settings}  # the spec's settings over the fast ones
    config = fast_config(strategy=name, strategies=sections)
    return lambda: Session(config, backbone=make_backbone(build_tokenizer()))


def packaged_session(spec: str, model: str):
    from continual_transformer.config import load_config
    from continual_transformer.evaluation.knowledge import parse_strategy_spec
    from continual_transformer.session import Session

    name, settings = parse_strategy_spec(spec)
    overrides = {"strategy": name, "model": {"name": model}, "strategies": {name: settings}}
    return lambda: Session(load_config(overrides=overrides))


def rounding_cost(session, exact) -> dict[str, Any]:
    """How far the rounded session's probe logits and greedy answers are from the exact one's."""
    import torch

    with torch.no_grad():
        rounded, reference = session.strategy.forward_logits(PROBE), exact.strategy.forward_logits(PROBE)
    return {
        "max_abs_logit_change": float((rounded - reference).abs().max()),
        "max_abs_logit": float(reference.abs().max()),
        "same_greedy_answers": session.strategy.generate(PROBE, max_new_tokens=16)
        == exact.strategy.generate(PROBE, max_new_tokens=16),
        "exact_state_bytes": exact.stats().state_bytes,
    }


def files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name[0] != "."}


def save(session, directory: Path) -> dict[str, int]:
    before = files(directory) if directory.exists() else {}
    session.save(directory)
    after = files(directory)
    written = sum(
        size for name, size in after.items() if name not in before or name.endswith((".json", ".yaml"))
    )
    return {"disk_bytes": sum(after.values()), "written_bytes": written, "files": len(after)}


def measure(strategy: str, build, work: Path, exact_build=None) -> dict[str, Any]:
    import torch

    from continual_transformer.documents import make_document

    session = build()
    directory = work / strategy.replace(":", "-")
    row: dict[str, Any] = {
        "strategy": strategy,
        "delta_bits": getattr(session.strategy.config, "delta_bits", None),
    }
    exact = exact_build() if exact_build is not None and row["delta_bits"] else None
    for n, text in enumerate(DOCS, 1):
        started = time.perf_counter()
        session.learn(make_document(text, f"doc{n}"))
        row[f"learn{n}_s"] = round(time.perf_counter() - started, 2)
        row[f"save{n}"] = save(session, directory)
        if exact is not None:  # after 1: the rounding alone; after 2: learning from rounded weights too
            exact.learn(make_document(text, f"doc{n}"))
            row[f"rounding{n}"] = rounding_cost(session, exact)
    if hasattr(session.strategy, "trainable_parameters"):
        row["whole_tensor_bytes"] = sum(
            p.numel() * p.element_size() for p in session.strategy.trainable_parameters().values()
        )
    row["state_bytes"] = session.stats().state_bytes
    with torch.no_grad():
        expected = session.strategy.forward_logits(PROBE)
    fresh = build()
    fresh.load(directory)
    with torch.no_grad():
        row["reload_bit_exact"] = bool(torch.equal(fresh.strategy.forward_logits(PROBE), expected))
    return row


def write(rows: list[dict[str, Any]], out: Path, model: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"model": model, "documents": DOCS, "rows": rows}, indent=2))

    def mb(n: int | None) -> str:
        return "-" if n is None else f"{n / 1e6:.3f}"

    lines = [
        f"# Checkpoint size per strategy ({model})",
        "",
        "Learn a two-sentence document and save; learn one more and save again. MB = 10^6 bytes. "
        "'whole' = the trained tensors stored in full (the format before deltas). A strategy that rounds "
        "what it learned to `delta_bits` is also run with exact deltas on the same documents: the state they "
        "take, the largest change of a probe logit (beside the largest logit) and whether greedy answers to "
        "the probes stay the same, after document 1 (the rounding alone) / after document 2 (learning went "
        "on from rounded weights: training itself can then take another path, e.g. stop an epoch earlier).",
        "",
        "| strategy | delta bits | on disk after 1 | written by save 1 | on disk after 2 "
        "| written by save 2 | whole | reload bit-exact | exact deltas: state | max logit change 1 / 2 (max) "
        "| same answers 1 / 2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['strategy']} | error: {r['error']} | | | | | | | | | |")
            continue
        one, two = r.get("rounding1"), r.get("rounding2")
        cost = (
            f"{mb(two['exact_state_bytes'])} | {one['max_abs_logit_change']:.4f} / "
            f"{two['max_abs_logit_change']:.4f} ({two['max_abs_logit']:.1f}) | "
            f"{one['same_greedy_answers']} / {two['same_greedy_answers']}"
            if one and two
            else "- | - | -"
        )
        lines.append(
            f"| {r['strategy']} | {r.get('delta_bits') if r.get('delta_bits') is not None else '-'} | "
            f"{mb(r['save1']['disk_bytes'])} | {mb(r['save1']['written_bytes'])} | "
            f"{mb(r['save2']['disk_bytes'])} | {mb(r['save2']['written_bytes'])} | "
            f"{mb(r.get('whole_tensor_bytes'))} | {r['reload_bit_exact']} | {cost} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="the random tiny test model (seconds)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--strategies", default="finetune,ttt,lora,memory_layer")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = "tiny-llama (random)" if args.tiny else args.model
    out = args.out or Path("benchmarks/results/checkpoints") / ("tiny" if args.tiny else "smollm2")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ctt-ckpt-sizes-") as work:
        make = tiny_session if args.tiny else functools.partial(packaged_session, model=args.model)
        for strategy in args.strategies.split(","):
            exact = functools.partial(lambda spec: make(f"{spec}:delta_bits=0")(), strategy)
            try:
                rows.append(measure(strategy, make(strategy), Path(work), exact))
            except Exception as exc:  # one strategy failing does not lose the others' rows
                rows.append({"strategy": strategy, "error": f"{type(exc).__name__}: {exc}"[:200]})
            print(json.dumps(rows[-1]), flush=True)
            write(rows, out, model)


if __name__ == "__main__":
    main()
