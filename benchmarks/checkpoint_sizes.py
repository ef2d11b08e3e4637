"""Checkpoint size and write cost per strategy: bytes on disk and bytes written by each save.

For each strategy: learn a two-sentence document, save; learn one more document, save again. Reports the
bytes on disk after each save, the bytes each save wrote (new tensor files plus manifest and config), what
the trained tensors would take stored whole (the format before deltas), and whether a fresh session that
loads the checkpoint computes bit-identical logits.

    PYTHONPATH=src python benchmarks/checkpoint_sizes.py --tiny
    PYTHONPATH=src python benchmarks/checkpoint_sizes.py --strategies finetune,lora   # packaged SmolLM2
"""

from __future__ import annotations

import argparse
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


def tiny_session(strategy: str):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tokenizer, fast_config, make_backbone

    from continual_transformer.session import Session

    return lambda: Session(fast_config(strategy=strategy), backbone=make_backbone(build_tokenizer()))


def packaged_session(strategy: str, model: str):
    from continual_transformer.config import load_config
    from continual_transformer.session import Session

    return lambda: Session(load_config(overrides={"strategy": strategy, "model": {"name": model}}))


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


def measure(strategy: str, build, work: Path) -> dict[str, Any]:
    import torch

    from continual_transformer.documents import make_document

    session = build()
    directory = work / strategy
    row: dict[str, Any] = {"strategy": strategy}
    for n, text in enumerate(DOCS, 1):
        started = time.perf_counter()
        session.learn(make_document(text, f"doc{n}"))
        row[f"learn{n}_s"] = round(time.perf_counter() - started, 2)
        row[f"save{n}"] = save(session, directory)
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
        "'whole' = the trained tensors stored in full (the format before deltas).",
        "",
        "| strategy | on disk after 1 | written by save 1 | on disk after 2 | written by save 2 | whole | "
        "reload bit-exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['strategy']} | error: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['strategy']} | {mb(r['save1']['disk_bytes'])} | {mb(r['save1']['written_bytes'])} | "
            f"{mb(r['save2']['disk_bytes'])} | {mb(r['save2']['written_bytes'])} | "
            f"{mb(r.get('whole_tensor_bytes'))} | {r['reload_bit_exact']} |"
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
        for strategy in args.strategies.split(","):
            build = tiny_session(strategy) if args.tiny else packaged_session(strategy, args.model)
            try:
                rows.append(measure(strategy, build, Path(work)))
            except Exception as exc:  # one strategy failing does not lose the others' rows
                rows.append({"strategy": strategy, "error": f"{type(exc).__name__}: {exc}"[:200]})
            print(json.dumps(rows[-1]), flush=True)
            write(rows, out, model)


if __name__ == "__main__":
    main()
