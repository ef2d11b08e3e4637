"""The language models ACE's roles talk to, behind one small interface: ``complete(messages) -> str``.

- :class:`BackboneBackend` (``backbone``, the default): the in-process model, chat template applied, greedy
  unless the generation config samples; works everywhere, batched by :meth:`complete_many`.
- :class:`OpenAIBackend` (``openai``): any OpenAI-compatible server's ``/v1/chat/completions``, through the
  ``openai`` package.
- :class:`OllamaBackend` (``ollama``): an Ollama server's ``/api/chat``, through the ``ollama`` package.

Both HTTP clients take their key from the environment (``CTT_ACE_API_KEY``, then ``OPENAI_API_KEY`` for the
OpenAI client), never from a config file, and turn a refused connection, a timeout, an HTTP error and a
malformed reply into :class:`BackendError` subclasses that say which server and what to do. The project's
own service (``ctt serve``) speaks both protocols.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from continual_transformer.errors import ContinualTransformerError

if TYPE_CHECKING:
    from continual_transformer.backbone import Backbone

logger = logging.getLogger(__name__)

Message = Mapping[str, str]
"""``{"role": "system" | "user" | "assistant", "content": "..."}``."""

KEY_VARIABLES = ("CTT_ACE_API_KEY", "OPENAI_API_KEY")
"""Environment variables read for an API key, in order."""
BACKENDS = ("backbone", "openai", "ollama")
DEFAULT_URLS = {"openai": "http://127.0.0.1:8000/v1", "ollama": "http://127.0.0.1:11434"}


class BackendError(ContinualTransformerError, RuntimeError):
    """A language-model backend failed (the message names the server and the cause)."""


class BackendConnectionError(BackendError):
    """The server could not be reached (connection refused, unknown host)."""


class BackendTimeoutError(BackendError):
    """The server did not answer within the timeout."""


class MalformedReplyError(BackendError):
    """The server answered something that is not a chat reply."""


@runtime_checkable
class LLMBackend(Protocol):
    """What ACE's roles need from a language model."""

    name: str

    def complete(self, messages: Sequence[Message], **options: Any) -> str:
        """The assistant's reply to ``messages``. Options: ``max_tokens``, ``temperature``."""
        ...

    def complete_many(self, conversations: Sequence[Sequence[Message]], **options: Any) -> list[str]:
        """Replies to several conversations (batched where the backend can)."""
        ...


def _check_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    out = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise BackendError(f"message {i}: needs role system/user/assistant and string content")
        out.append({"role": role, "content": content})
    if not out or out[-1]["role"] != "user":
        raise BackendError("the last message must be the user's")
    return out


def api_key(variables: Sequence[str] = KEY_VARIABLES) -> str | None:
    """The first non-empty key among the environment ``variables``."""
    for name in variables:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


class BackboneBackend:
    """The in-process backbone as a chat model."""

    name = "backbone"

    def __init__(self, backbone: Backbone, *, max_tokens: int = 96) -> None:
        self.backbone = backbone
        self.max_tokens = max_tokens

    def format(self, messages: Sequence[Message]) -> str:
        """The exact model input: the chat template with a generation prompt, or role-prefixed lines."""
        checked = _check_messages(messages)
        tokenizer = self.backbone.tokenizer
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template(checked, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in checked) + "\n\nassistant:"

    def complete(self, messages: Sequence[Message], **options: Any) -> str:
        return self.complete_many([messages], **options)[0]

    def complete_many(self, conversations: Sequence[Sequence[Message]], **options: Any) -> list[str]:
        texts = [self.format(m) for m in conversations]
        if not texts:
            return []
        return self.backbone.generate(
            texts, formatted=True, max_new_tokens=int(options.get("max_tokens") or self.max_tokens)
        )


class _HTTPBackend:
    name = "http"

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        timeout: float = 60.0,
        key: str | None = None,
        max_tokens: int = 96,
    ) -> None:
        if timeout <= 0:
            raise BackendError(f"{self.name}: timeout must be > 0, got {timeout}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = float(timeout)
        self.key = key if key is not None else api_key()
        self.max_tokens = max_tokens

    def complete_many(self, conversations: Sequence[Sequence[Message]], **options: Any) -> list[str]:
        return [self.complete(m, **options) for m in conversations]

    def complete(self, messages: Sequence[Message], **options: Any) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class OpenAIBackend(_HTTPBackend):
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint (``base_url`` ends with ``/v1``)."""

    name = "openai"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        openai = _require("openai")
        self._openai = openai
        self.client = openai.OpenAI(
            base_url=self.base_url, api_key=self.key or "none", timeout=self.timeout, max_retries=0
        )

    def complete(self, messages: Sequence[Message], **options: Any) -> str:
        openai = self._openai
        where = f"OpenAI-compatible server {self.base_url}"
        try:
            reply = self.client.chat.completions.create(
                model=self.model,
                messages=_check_messages(messages),  # type: ignore[arg-type]
                max_tokens=int(options.get("max_tokens") or self.max_tokens),
                temperature=float(options.get("temperature", 0.0)),
            )
        except openai.APITimeoutError:
            raise BackendTimeoutError(f"{where} did not answer within {self.timeout:g} s") from None
        except openai.APIConnectionError as exc:
            raise BackendConnectionError(
                f"cannot reach {where} ({exc.__cause__ or exc}); is it running? (base_url in "
                "strategies.ace.base_url)"
            ) from None
        except openai.AuthenticationError:
            raise BackendError(f"{where} refused the API key (set {' or '.join(KEY_VARIABLES)})") from None
        except openai.APIStatusError as exc:
            raise BackendError(f"{where} answered HTTP {exc.status_code}: {_short(exc.message)}") from None
        except openai.APIResponseValidationError as exc:
            raise MalformedReplyError(f"{where} sent a malformed reply: {_short(str(exc))}") from None
        choices = getattr(reply, "choices", None)
        content = None
        if isinstance(choices, list) and choices:
            message = getattr(choices[0], "message", None)
            content = getattr(message, "content", None)
        if not isinstance(content, str):
            raise MalformedReplyError(f"{where} sent a reply without choices[0].message.content")
        return content.strip()


class OllamaBackend(_HTTPBackend):
    """An Ollama ``/api/chat`` endpoint (``base_url`` is the server, e.g. ``http://127.0.0.1:11434``)."""

    name = "ollama"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        ollama = _require("ollama")
        self._ollama = ollama
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else None
        self.client = ollama.Client(host=self.base_url, timeout=self.timeout, headers=headers)

    def complete(self, messages: Sequence[Message], **options: Any) -> str:
        import httpx

        ollama = self._ollama
        where = f"Ollama server {self.base_url}"
        try:
            reply = self.client.chat(
                model=self.model,
                messages=_check_messages(messages),
                options={
                    "num_predict": int(options.get("max_tokens") or self.max_tokens),
                    "temperature": float(options.get("temperature", 0.0)),
                },
            )
        except httpx.TimeoutException:
            raise BackendTimeoutError(f"{where} did not answer within {self.timeout:g} s") from None
        except (ConnectionError, httpx.TransportError) as exc:
            raise BackendConnectionError(
                f"cannot reach {where} ({_short(str(exc))}); is it running? (base_url in "
                "strategies.ace.base_url)"
            ) from None
        except ollama.ResponseError as exc:
            raise BackendError(f"{where} answered HTTP {exc.status_code}: {_short(exc.error)}") from None
        except (ValueError, TypeError, KeyError) as exc:  # a body that is not an Ollama chat reply
            raise MalformedReplyError(f"{where} sent a malformed reply: {_short(str(exc))}") from None
        message = getattr(reply, "message", None)
        content = getattr(message, "content", None)
        if not isinstance(content, str):
            raise MalformedReplyError(f"{where} sent a reply without message.content")
        return content.strip()


def _require(package: str) -> Any:
    """The client package of an HTTP backend, or a clear error saying how to install it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise BackendError(
            f"the {package} backend needs the {package!r} package: pip install 'continual-transformer[ace]'"
        ) from None


def _short(text: Any, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def make_backend(
    kind: str,
    *,
    backbone: Backbone | None = None,
    base_url: str | None = None,
    model: str | None = None,
    timeout: float = 60.0,
    max_tokens: int = 96,
) -> LLMBackend:
    """A backend by name (``backbone``, ``openai`` or ``ollama``)."""
    if kind == "backbone":
        if backbone is None:
            raise BackendError("the backbone backend needs a backbone")
        return BackboneBackend(backbone, max_tokens=max_tokens)
    if kind not in BACKENDS:
        raise BackendError(f"unknown backend {kind!r}; known: {', '.join(BACKENDS)}")
    if not model:
        raise BackendError(f"the {kind} backend needs a model name (strategies.ace.model)")
    cls = OpenAIBackend if kind == "openai" else OllamaBackend
    return cls(base_url=base_url or DEFAULT_URLS[kind], model=model, timeout=timeout, max_tokens=max_tokens)
