"""The ACE playbook: itemised bullets with stable ids, grouped in sections, with helpful / harmful counters.

A bullet is one insight (a strategy, a fact, a mistake to avoid). Bullets are never rewritten wholesale: the
Curator's small operations (:mod:`continual_transformer.ace.operations`) add, update or remove them one at a
time, and the Reflector's tags move their counters (Zhang et al. 2025, "Agentic context engineering", section
3: incremental delta updates instead of monolithic rewrites, which collapse the context).

A playbook is plain JSON (``{"format": "ctt-ace-playbook", "version": 1, ...}``). :meth:`Playbook.from_dict`
validates everything before a playbook exists, so a malformed or foreign file is refused with an error that
names the file and the field. :class:`PlaybookStore` keeps named playbooks in a directory, one file each,
written atomically (temporary file, fsync, rename), names checked so that no path leaves the directory.

Torch-free.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from continual_transformer.errors import ContinualTransformerError

FORMAT = "ctt-ace-playbook"
VERSION = 1
ID_PREFIX = "ctx"
ID_PATTERN = re.compile(r"^ctx-(\d{5,9})$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SECTION_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
FILE_SUFFIX = ".playbook.json"
MAX_FILE_BYTES = 16_000_000
MAX_BULLET_CHARS = 2000
DEFAULT_SECTIONS = ("strategies", "facts", "mistakes")
"""Sections of a new playbook: general strategies and rules, facts learned from feedback, mistakes to
avoid."""

_BULLET_KEYS = {"id", "section", "text", "helpful", "harmful", "created_step", "updated_step"}
_PLAYBOOK_KEYS = {"format", "version", "name", "sections", "step", "next_id", "bullets"}


class PlaybookError(ContinualTransformerError, ValueError):
    """A playbook (or its file, or its name) is malformed, foreign or not found."""


def bullet_id(number: int) -> str:
    """The id of the ``number``-th bullet ever added to a playbook (``ctx-00001``)."""
    return f"{ID_PREFIX}-{number:05d}"


def normalise_bullet_text(text: str) -> str:
    """The text used to recognise an exact duplicate: lower case, whitespace collapsed, no end punctuation."""
    return " ".join(text.lower().split()).strip(" .;:!")


@dataclass(frozen=True, kw_only=True)
class Bullet:
    """One itemised insight of a playbook."""

    id: str
    """Stable id (``ctx-00001``), never reused in the playbook, even after the bullet is removed."""
    section: str
    """The section it belongs to."""
    text: str
    """The insight itself, one line."""
    helpful: int = 0
    """Times the Reflector (or the check that ran) found it helped an answer."""
    harmful: int = 0
    """Times it was found to mislead an answer."""
    created_step: int = 0
    """Playbook step (Generate-Reflect-Curate round) at which it was added."""
    updated_step: int = 0
    """Last step at which its text or counters changed."""

    @property
    def usefulness(self) -> int:
        """``helpful - harmful``: the least useful bullets are evicted first when the playbook is full."""
        return self.helpful - self.harmful

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "section": self.section,
            "text": self.text,
            "helpful": self.helpful,
            "harmful": self.harmful,
            "created_step": self.created_step,
            "updated_step": self.updated_step,
        }

    def render(self) -> str:
        """The bullet as the roles read it: ``[ctx-00001] text``."""
        return f"[{self.id}] {self.text}"


@dataclass(kw_only=True)
class Playbook:
    """Bullets in sections, in insertion order, plus the step and id counters.

    Mutated only through :mod:`continual_transformer.ace.operations` and :meth:`tag` (counters); every
    change bumps :attr:`version` so indexes built over the bullets know when to rebuild.
    """

    name: str = "playbook"
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    step: int = 0
    """Generate-Reflect-Curate rounds run so far."""
    next_id: int = 1
    """Number of the next bullet id (ids are never reused)."""
    bullets: list[Bullet] = field(default_factory=list)
    version: int = 0
    """Bumped on every change (not saved)."""

    def __post_init__(self) -> None:
        check_name(self.name)
        self.sections = tuple(self.sections)
        for section in self.sections:
            if not isinstance(section, str) or not SECTION_PATTERN.match(section):
                raise PlaybookError(f"section {section!r} must be lower-case letters, digits and underscores")
        if len(set(self.sections)) != len(self.sections) or not self.sections:
            raise PlaybookError(f"sections must be distinct and not empty, got {list(self.sections)}")

    # -- reading ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.bullets)

    def __iter__(self) -> Iterator[Bullet]:
        return iter(self.bullets)

    def get(self, bullet_id: str) -> Bullet | None:
        return next((b for b in self.bullets if b.id == bullet_id), None)

    def ids(self) -> list[str]:
        return [b.id for b in self.bullets]

    def render(self, bullets: Sequence[Bullet] | None = None) -> str:
        """The bullets (default: all) grouped by section, in section order: what goes into a prompt."""
        chosen = list(self.bullets if bullets is None else bullets)
        lines: list[str] = []
        for section in self.sections:
            inside = [b for b in chosen if b.section == section]
            if inside:
                lines.append(f"## {section}")
                lines.extend(b.render() for b in inside)
        return "\n".join(lines)

    # -- changing --------------------------------------------------------------------------------------------
    def _replace(self, index: int, bullet: Bullet) -> None:
        self.bullets[index] = bullet
        self.version += 1

    def tag(self, bullet_id: str, tag: str, *, step: int | None = None) -> bool:
        """Count a Reflector tag (``helpful``, ``harmful`` or ``neutral``) on a bullet; False if unknown."""
        if tag not in ("helpful", "harmful", "neutral"):
            raise PlaybookError(f"tag must be helpful, harmful or neutral, got {tag!r}")
        for i, bullet in enumerate(self.bullets):
            if bullet.id == bullet_id:
                if tag != "neutral":
                    changes = {tag: getattr(bullet, tag) + 1}
                    self._replace(
                        i, replace(bullet, updated_step=self.step if step is None else step, **changes)
                    )
                return True
        return False

    def clear(self) -> None:
        """No bullets, step and ids back to the start."""
        self.bullets, self.step, self.next_id = [], 0, 1
        self.version += 1

    def copy(self) -> Playbook:
        return Playbook.from_dict(self.to_dict())

    # -- JSON ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "sections": list(self.sections),
            "step": self.step,
            "next_id": self.next_id,
            "bullets": [b.to_dict() for b in self.bullets],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "playbook") -> Playbook:
        """A playbook from its JSON form, every field checked (errors name ``where`` and the field)."""

        def fail(message: str) -> PlaybookError:
            return PlaybookError(f"{where}: {message}")

        if not isinstance(data, Mapping):
            raise fail(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise fail(f"not an ACE playbook (format {data.get('format')!r}, expected {FORMAT!r})")
        if data.get("version") != VERSION:
            raise fail(f"playbook version {data.get('version')!r} is not supported (this library reads 1)")
        unknown = sorted(set(data) - _PLAYBOOK_KEYS)
        missing = sorted(_PLAYBOOK_KEYS - set(data))
        if unknown or missing:
            raise fail(f"unknown keys {unknown}, missing keys {missing}")
        name, sections = data["name"], data["sections"]
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise fail(f"name {name!r} is not a valid playbook name")
        if not isinstance(sections, list) or not all(isinstance(s, str) for s in sections):
            raise fail("sections must be a list of strings")
        step, next_id = data["step"], data["next_id"]
        if not _natural(step):
            raise fail(f"step must be an integer >= 0, got {step!r}")
        if not _natural(next_id) or next_id < 1:
            raise fail(f"next_id must be an integer >= 1, got {next_id!r}")
        raw = data["bullets"]
        if not isinstance(raw, list):
            raise fail("bullets must be a list")
        bullets, seen = [], set()
        for i, item in enumerate(raw):
            at = f"bullets[{i}]"
            if not isinstance(item, Mapping):
                raise fail(f"{at}: expected an object")
            if set(item) != _BULLET_KEYS:
                raise fail(
                    f"{at}: unknown keys {sorted(set(item) - _BULLET_KEYS)}, "
                    f"missing keys {sorted(_BULLET_KEYS - set(item))}"
                )
            match = ID_PATTERN.match(item["id"]) if isinstance(item["id"], str) else None
            if match is None:
                raise fail(f"{at}.id: {item['id']!r} is not a bullet id (ctx-00001)")
            if item["id"] in seen:
                raise fail(f"{at}.id: duplicate id {item['id']!r}")
            if int(match.group(1)) >= next_id:
                raise fail(f"{at}.id: {item['id']!r} is not below next_id {next_id}")
            seen.add(item["id"])
            if item["section"] not in sections:
                raise fail(f"{at}.section: {item['section']!r} is not one of {sections}")
            text = item["text"]
            if not isinstance(text, str) or not text.strip() or len(text) > MAX_BULLET_CHARS:
                raise fail(f"{at}.text: must be a non-blank string of at most {MAX_BULLET_CHARS} characters")
            for key in ("helpful", "harmful", "created_step", "updated_step"):
                if not _natural(item[key]):
                    raise fail(f"{at}.{key}: must be an integer >= 0, got {item[key]!r}")
            if not item["created_step"] <= item["updated_step"] <= step:
                raise fail(f"{at}: created_step <= updated_step <= step does not hold")
            bullets.append(Bullet(**{key: item[key] for key in _BULLET_KEYS}))
        try:
            return cls(name=name, sections=tuple(sections), step=step, next_id=next_id, bullets=bullets)
        except PlaybookError as exc:
            raise fail(str(exc)) from None

    @classmethod
    def from_json(cls, text: str, *, where: str = "playbook") -> Playbook:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise PlaybookError(f"{where}: not valid JSON ({exc})") from None
        return cls.from_dict(data, where=where)


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_name(name: Any) -> str:
    """``name`` if it is a valid playbook name (letters, digits, ``_ . -``, starting with a letter or digit,
    at most 64 characters: no path separators, so no name leaves the playbook directory)."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise PlaybookError(
            f"playbook name {name!r} is not valid: use letters, digits, '_', '.' and '-' (at most 64, "
            "starting with a letter or digit, no '..')"
        )
    return name


@dataclass(frozen=True)
class PlaybookInfo:
    """A stored playbook as :meth:`PlaybookStore.list` reports it."""

    name: str
    bullets: int
    step: int
    path: Path


class PlaybookStore:
    """Named playbooks in one directory, one ``<name>.playbook.json`` file each."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, name: str) -> Path:
        return self.directory / f"{check_name(name)}{FILE_SUFFIX}"

    def save(self, playbook: Playbook, name: str | None = None) -> Path:
        """Write ``playbook`` as ``name`` (default: its own name), atomically; returns the file."""
        from continual_transformer.checkpoint import _atomic_write  # the project's one atomic write

        name = check_name(playbook.name if name is None else name)
        self.directory.mkdir(parents=True, exist_ok=True)
        data = dict(playbook.to_dict(), name=name)
        path = self.path(name)
        _atomic_write(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        return path

    def load(self, name: str) -> Playbook:
        """The playbook stored as ``name``, validated (:class:`PlaybookError` names what is wrong)."""
        return read_playbook(self.path(name))

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def delete(self, name: str) -> None:
        path = self.path(name)
        if not path.is_file():
            raise PlaybookError(f"no playbook {name!r} in {self.directory}")
        path.unlink()

    def names(self) -> list[str]:
        """Names of the stored playbooks (files with the playbook suffix and a valid name), sorted."""
        if not self.directory.is_dir():
            return []
        names = []
        for path in sorted(self.directory.iterdir()):
            name = path.name.removesuffix(FILE_SUFFIX)
            if path.name.endswith(FILE_SUFFIX) and path.is_file() and NAME_PATTERN.match(name):
                names.append(name)
        return names

    def list(self) -> list[PlaybookInfo]:
        """Every stored playbook with its size; a malformed file raises :class:`PlaybookError`."""
        infos = []
        for name in self.names():
            playbook = self.load(name)
            infos.append(PlaybookInfo(name, len(playbook), playbook.step, self.path(name)))
        return infos


def read_playbook(path: str | Path) -> Playbook:
    """A playbook file, size-limited, UTF-8, validated."""
    path = Path(path)
    if not path.is_file():
        raise PlaybookError(f"{path}: no such playbook file")
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise PlaybookError(f"{path}: file is {size:,} bytes, over the limit of {MAX_FILE_BYTES:,}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise PlaybookError(f"{path}: not UTF-8 text") from None
    return Playbook.from_json(text, where=str(path))
