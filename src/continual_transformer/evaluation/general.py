"""Held-out general text for perplexity: WikiText-2 valid from the data directory, or built-in prose."""

from __future__ import annotations

from pathlib import Path

# Used when the data directory has no WikiText-2 (e.g. an installed package outside a checkout).
BUILTIN_TEXT = """\
The history of astronomy is one of the oldest of the natural sciences. Early cultures identified celestial
objects with gods and spirits, and related these objects and their movements to phenomena such as rain,
drought, seasons and tides. It is generally believed that the first astronomers were priests, and that they
understood celestial objects and events to be manifestations of the divine. Later, careful observation of
the sky allowed calendars to be made, and the motion of the planets to be predicted. The invention of the
telescope in the early seventeenth century changed astronomy into a modern science. With it, observers saw
the moons of Jupiter, the phases of Venus and spots on the Sun, and the old picture of the heavens as
perfect and unchanging could no longer be held. In the nineteenth century photography and spectroscopy
allowed astronomers to study the chemical composition of stars, and in the twentieth century radio waves,
X-rays and other parts of the spectrum opened new windows on the universe.
"""


def general_text(data_dir: str | Path, max_chars: int | None = None) -> tuple[str, str]:
    """(text, source): WikiText-2 valid when ``data_dir/wikitext2`` has it, else built-in prose."""
    folder = Path(data_dir) / "wikitext2"
    candidates = sorted(folder.glob("*valid*")) if folder.is_dir() else []
    if candidates:
        text = candidates[0].read_text(encoding="utf-8")
        return (text[:max_chars] if max_chars else text), str(candidates[0])
    return BUILTIN_TEXT, "built-in general text"
