"""The command line (``python -m continual_transformer``'s arguments) with the GPU's recorded decoding run on
the CPU: chunks of compiled steps, the compiled prompt pass and the compiled token pick, where a GPU would
record each chunk and prompt pass as a CUDA graph and replay it. Here the warm-up runs and every "replay"
runs the recorded function itself, on the same static buffers; nothing is recorded. Everything else is the
product's own code: what differs from a GPU is the device, its kernels and the absent graphs.

It is the CPU check of the recorded path on whole benchmarks (the GPU check is
``benchmarks/runs/fastpath_knowledge.sh``): with ``--set generation.backend=compiled`` a knowledge benchmark
answers through the same chunks, prompt pass and token pick as on a GPU, and its figures can be set beside
the eager backend's (``BACKEND=recorded`` in ``fastpath_knowledge.sh``).

    python benchmarks/recorded_on_cpu.py --model smollm2-135m-instruct --set generation.backend=compiled \\
        bench knowledge --quick --strategies finetune --out /tmp/recorded
"""

from __future__ import annotations

import atexit
import sys
from collections import Counter
from collections.abc import Callable

from continual_transformer.backbone import Backbone
from continual_transformer.cli import main

COUNTS: Counter[str] = Counter()  # recordings and replays, told on exit


class Replayed:
    """What a CUDA graph is to the GPU path: ``replay()`` runs what was recorded."""

    def __init__(self, run: Callable[[], None]) -> None:
        self.run = run

    def replay(self) -> None:
        COUNTS["replays"] += 1
        self.run()


def record(device: object, warm_up: Callable[[], None], run: Callable[[], None]) -> Replayed:
    """:meth:`Backbone._record_chunk` without a graph: the warm-up (which compiles) runs, ``run`` is kept."""
    warm_up()
    COUNTS["recordings"] += 1
    return Replayed(run)


def install() -> None:
    """The backbone records this way and starts from recorded chunks on any device (the GPU's first choice,
    :meth:`Backbone._lean_step_mode`); the counts are printed on exit."""
    step_mode = Backbone._lean_step_mode

    def recorded_mode(self: Backbone, compiled: bool) -> str:
        if self._lean_mode is None:
            self._lean_mode = "graphs"
        return step_mode(self, compiled)

    Backbone._record_chunk = staticmethod(record)
    Backbone._lean_step_mode = recorded_mode
    atexit.register(
        lambda: print(
            f"recorded on the CPU: {COUNTS['recordings']} recordings, {COUNTS['replays']} replays",
            file=sys.stderr,
        )
    )


if __name__ == "__main__":
    install()
    main()
