"""Request bodies of the native API (pydantic, strict: unknown fields and wrong types are refused) and the
text type every API shares (valid Unicode only: a lone surrogate would fail later, inside the tokenizer)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return value


def _plain_id(value: str) -> str:
    if not value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("ids are non-blank and hold no control characters")
    return value


Text = Annotated[str, AfterValidator(_unicode)]
"""Any valid Unicode string."""
DocumentId = Annotated[
    str, Field(min_length=1, max_length=256), AfterValidator(_unicode), AfterValidator(_plain_id)
]
"""A document id: 1-256 characters, no control characters."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LearnRequest(Strict):
    text: Text
    """The document."""
    id: DocumentId | None = None
    """Its id (default: ``doc-`` and 12 hex digits of its SHA-256). An id already learned is refused (409)."""
    source: Annotated[Text, Field(max_length=1024)] | None = None
    """Where it came from (kept in the history)."""
    wait: bool = False
    """Answer once the document is learned (200, with the learning report) instead of once it is durable
    (202)."""


class AskRequest(Strict):
    question: Annotated[Text, Field(min_length=1)]
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None


class GenerateRequest(Strict):
    prompts: Annotated[list[Text], Field(min_length=1, max_length=64)]
    chat: bool | None = None
    """Apply the chat template (default: the config's ``generation.chat_template``)."""
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None


class CheckpointRequest(Strict):
    name: Annotated[Text, Field(min_length=1, max_length=64)]
