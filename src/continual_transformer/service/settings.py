"""Settings of ``ctt serve``: one frozen dataclass, validated where it is built (torch- and fastapi-free)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the service on this machine (``127.0.0.0/8``, ``::1``,
    ``localhost``)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    host: str = "127.0.0.1"
    """Address to bind. Anything beyond loopback turns token auth on (a token is generated when none is
    given)."""
    port: int = 8000
    """TCP port (0 picks a free one)."""
    state_dir: Path = Path("ctt-serve")
    """Where the service keeps its checkpoint snapshots, journal, named checkpoints and lock."""
    token: str | None = None
    """Bearer token every request except ``/health`` and ``/ready`` must carry; ``None`` means no auth on
    loopback."""
    queue_size: int = 64
    """Learning requests acknowledged but not yet applied; one more is refused with HTTP 429."""
    generation_queue_size: int = 256
    """Generation requests waiting for the model; one more is refused with HTTP 429."""
    checkpoint_interval: float = 60.0
    """Seconds between snapshots while there is unsaved learning (the journal covers the time between)."""
    checkpoint_every: int = 100
    """A snapshot after this many documents applied, whichever of the two comes first."""
    max_batch: int = 8
    """Generation requests answered in one ``session.generate`` call (1 turns batching off)."""
    batch_wait: float = 0.005
    """Seconds the generation thread waits for more requests to join a batch."""
    continuous: bool = False
    """Continuous batching of greedy answers (:class:`~continual_transformer.decode_slots.DecodeSlots`):
    up to ``max_batch`` answers decode together, a request that arrives joins at the next decoding step and
    a finished answer is returned at once (a short answer no longer waits for the longest one in its batch).
    Requests with sampling settings, a seed, stop sequences or streaming, prompts that do not fit
    ``continuous_length``, and strategies that change answers per call (retrieved context, kNN mixing,
    fused memories, a relevance gate, any strategy with its own ``generate``) take the batch path. Chat
    prompts prefill only what follows the template's shared system part. On one CPU thread with
    SmolLM2-135M, 8 closed-loop clients of 8 to 64 new tokens: 2.3x the new tokens/s, p50 1.9x and p95 2.2x
    lower, the same answers (``benchmarks/results/speed/cpu-service``)."""
    continuous_length: int = 1024
    """Cache positions of each continuous-batching row: a request's prompt (chat template included) and
    its new tokens must fit in fewer; longer ones take the batch path. The cache holds ``max_batch`` rows of
    this many positions."""
    max_body_bytes: int = 4_000_000
    """Largest request body; larger ones get HTTP 413 before they are read in full."""
    max_new_tokens: int = 512
    """Largest ``max_tokens`` a request may ask for (OpenAI and Ollama requests are clamped to it)."""
    request_timeout: float = 300.0
    """Seconds a request waits for its answer (or, with ``wait``, for its document to be learned); then
    HTTP 504."""
    body_timeout: float = 30.0
    """Seconds a client has to send its whole request body; then HTTP 408 (a stalled or very slow client
    holds no handler)."""
    generation_timeout: float = 120.0
    """Seconds one generation may run; a longer one is stopped and answered with HTTP 504 (a streamed answer
    ends with an error event). Waiting in the queue counts against ``request_timeout``."""
    model_id: str | None = None
    """Model name listed by ``/v1/models`` and ``/api/tags`` (default: the session's base model name)."""
    limit_concurrency: int = 512
    """Open connections uvicorn serves at once; more get HTTP 503."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        checks = {
            "port": 0 <= self.port <= 65535,
            "queue_size": self.queue_size >= 1,
            "generation_queue_size": self.generation_queue_size >= 1,
            "checkpoint_interval": self.checkpoint_interval > 0,
            "checkpoint_every": self.checkpoint_every >= 1,
            "max_batch": self.max_batch >= 1,
            "batch_wait": self.batch_wait >= 0,
            "continuous_length": self.continuous_length >= 2,
            "max_body_bytes": self.max_body_bytes >= 1024,
            "max_new_tokens": self.max_new_tokens >= 1,
            "request_timeout": self.request_timeout > 0,
            "body_timeout": self.body_timeout > 0,
            "generation_timeout": self.generation_timeout > 0,
            "limit_concurrency": self.limit_concurrency >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid service settings: {', '.join(f'{b}={getattr(self, b)!r}' for b in bad)}"
            )
        if self.token is not None and len(self.token) < 8:
            raise ValueError("the service token must be at least 8 characters")

    @property
    def auth_required(self) -> bool:
        return self.token is not None
