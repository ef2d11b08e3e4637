"""Cheap imports: the package, its config and the commands that need no model import no torch.

Each check runs in a fresh interpreter, since this test process has torch loaded already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft")

PROBE = """
import json, sys
{body}
print(json.dumps({{name: name in sys.modules for name in {heavy!r}}}))
"""


def heavy_modules_after(body: str) -> dict[str, bool]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = PROBE.format(body=body, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "body",
    [
        "import continual_transformer",
        "import continual_transformer.config",
        "from continual_transformer import Config, load_config, registry, register_strategy; load_config()",
        "from continual_transformer.strategies import registry; registry.names()",
        "import continual_transformer.tasks.config",
        "import continual_transformer.session",
        "import continual_transformer.continual",
        "import continual_transformer.service.run",
        "import continual_transformer.cli",
    ],
)
def test_imports_load_no_torch(body):
    assert heavy_modules_after(body) == dict.fromkeys(HEAVY, False)


@pytest.mark.parametrize(
    "args", [["--help"], ["models", "list"], ["config", "show"], ["--set", "seed=3", "config", "show"]]
)
def test_commands_without_a_model_load_no_torch(args, tmp_path, monkeypatch):
    body = (
        "from continual_transformer.cli import main\n"
        f"sys.argv = ['ctt', *{args!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "sys.stdout = sys.__stdout__\n"
    )
    monkeypatch.setenv("CTT_CACHE", str(tmp_path / "cache"))  # the command's output comes before the probe's
    assert heavy_modules_after(body) == dict.fromkeys(HEAVY, False)


def test_the_probe_sees_torch_when_it_is_imported():
    assert heavy_modules_after("import continual_transformer.backbone")["torch"] is True


def test_lazy_public_names_resolve_to_the_library_objects():
    import continual_transformer
    from continual_transformer.continual import ContinualTransformer
    from continual_transformer.strategies import registry

    assert continual_transformer.ContinualTransformer is ContinualTransformer
    assert continual_transformer.registry is registry, "the strategy registry, not the registry module"
    assert set(continual_transformer.__all__) <= set(dir(continual_transformer))
    with pytest.raises(AttributeError):
        continual_transformer.no_such_name  # noqa: B018
