"""Chat messages (OpenAI or Ollama) as the one prompt a session answers.

``Session.generate`` takes one prompt per answer and applies the chat template itself (strategies such as
``in_context`` put their documents into that prompt), so a conversation is flattened: system messages
first, earlier turns as ``role: text`` lines, then the last user message. A single user message is passed
through unchanged, so it is answered exactly as ``session.ask`` answers it.
"""

from __future__ import annotations

from collections.abc import Sequence

from continual_transformer.service.errors import ServiceError

SYSTEM_ROLES = ("system", "developer")
ROLES = (*SYSTEM_ROLES, "user", "assistant", "tool")


def conversation_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """The prompt for ``(role, text)`` messages; the last must be the user's."""
    if not messages:
        raise ServiceError(400, "messages is empty")
    role, last = messages[-1]
    if role != "user":
        raise ServiceError(400, f"the last message must be the user's, got role {role!r}")
    system = [text for r, text in messages[:-1] if r in SYSTEM_ROLES and text.strip()]
    turns = [f"{r}: {text}" for r, text in messages[:-1] if r not in SYSTEM_ROLES]
    if not system and not turns:
        return last
    parts = [*system]
    if turns:
        parts.append("\n".join(turns))
    parts.append(last)
    return "\n\n".join(parts)
