"""Per-request generation settings (sampling, seed, stop sequences) and token streaming.

:class:`GenerationOptions` turns what an OpenAI or Ollama request asks for into ``model.generate`` keyword
arguments (temperature 0 or none given: greedy, the session's own setting otherwise). :class:`TextStream`
reads the text a :class:`transformers.TextIteratorStreamer` receives while the model generates and hands out
the pieces the final answer is made of: leading and trailing whitespace dropped as the non-streamed answer
drops it, and cut before the first stop sequence, so the pieces concatenate to exactly the answer a
non-streamed request with the same settings gets.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from continual_transformer.backbone import Backbone

MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 200


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    """Sampling settings of one request (``None``: the session's generation config decides)."""

    temperature: float | None = None
    """0 means greedy; above 0 samples at this temperature."""
    top_p: float | None = None
    """Nucleus sampling mass (sampling at temperature 1 when no temperature is given)."""
    seed: int | None = None
    """Seed of the sampling draws: the same seed and settings give the same answer."""
    stop: tuple[str, ...] = ()
    """The answer ends before the first of these strings (generation stops once one appears)."""

    def __post_init__(self) -> None:
        from continual_transformer.service.errors import ServiceError

        if self.temperature is not None and not 0 <= self.temperature <= 100:
            raise ServiceError(400, f"temperature must be between 0 and 100, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ServiceError(400, f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ServiceError(400, "seed is out of range")
        if len(self.stop) > MAX_STOP_SEQUENCES or any(
            not s or len(s) > MAX_STOP_CHARS or not isinstance(s, str) for s in self.stop
        ):
            raise ServiceError(
                400,
                f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings of at most {MAX_STOP_CHARS} "
                "characters",
            )

    @classmethod
    def of(
        cls,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> GenerationOptions:
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return cls(temperature=temperature, top_p=top_p, seed=seed, stop=stops)

    @property
    def samples(self) -> bool | None:
        """Whether the request samples (``None``: as the session's config says)."""
        if self.temperature is not None:
            return self.temperature > 0
        return True if self.top_p is not None else None

    @property
    def plain(self) -> bool:
        """No setting of its own: the request may share a batch with any other plain one."""
        return self == GenerationOptions()

    def generate_kwargs(self, backbone: Backbone) -> dict[str, Any]:
        """Keyword arguments of ``model.generate`` for these settings."""
        kwargs: dict[str, Any] = {}
        if self.samples is False:
            kwargs.update(do_sample=False, temperature=None, top_p=None)
        elif self.samples:
            kwargs.update(
                do_sample=True,
                temperature=self.temperature if self.temperature is not None else 1.0,
                top_p=self.top_p if self.top_p is not None else 1.0,
            )
        if self.stop:
            kwargs.update(stop_strings=list(self.stop), tokenizer=backbone.tokenizer)
        return kwargs

    def seeded(self, backbone: Backbone) -> contextlib.AbstractContextManager[Any]:
        """The random state of the draws: seeded from :attr:`seed` inside, restored after (no global
        change)."""
        if self.seed is None:
            return contextlib.nullcontext()
        return _seeded(self.seed, backbone)

    def finish(self, text: str) -> tuple[str, bool]:
        """The answer of generated ``text``: cut before the first stop sequence, outer whitespace dropped;
        and whether a stop sequence ended it."""
        cut, stopped = cut_at_stop(text.lstrip(), self.stop)
        return cut.rstrip(), stopped


@contextlib.contextmanager
def _seeded(seed: int, backbone: Backbone) -> Iterator[None]:
    import torch

    device = backbone.device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed % 2**63)
        yield


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the earliest stop sequence, and whether one was found."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


class TextStream:
    """The pieces of one answer while it is generated (iterate; see the module docstring).

    ``streamer`` is the :class:`~transformers.TextIteratorStreamer` given to generation and ``future`` the
    request's future; iteration ends when generation does, when the future fails (its error is then raised
    by ``future.result()``) or after ``timeout`` seconds (:class:`TimeoutError`).
    """

    def __init__(self, streamer: Any, future: Future, options: GenerationOptions, timeout: float) -> None:
        self.streamer, self.future, self.options, self.timeout = streamer, future, options, timeout
        self.stopped = False

    def __iter__(self) -> Iterator[str]:
        deadline = time.monotonic() + self.timeout
        raw, sent = "", 0
        hold = max((len(s) for s in self.options.stop), default=1) - 1
        pieces = iter(self.streamer)
        while True:
            try:
                raw += next(pieces)
            except StopIteration:
                break
            except queue.Empty:  # nothing new yet: has the request failed before generating?
                if self.future.done() and self.future.exception() is not None:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no answer within {self.timeout:g} seconds") from None
                continue
            visible, self.stopped = cut_at_stop(raw.lstrip(), self.options.stop)
            if self.stopped:
                break
            # hold back what may still become part of a stop sequence, and trailing whitespace
            safe = len(visible.rstrip()) if not hold else min(len(visible.rstrip()), len(visible) - hold)
            if safe > sent:
                yield visible[sent:safe]
                sent = safe
        final, self.stopped = self.options.finish(raw)
        if len(final) > sent:
            yield final[sent:]
