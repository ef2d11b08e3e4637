"""The generic lazy registry and the strategy registry built on it."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from continual_transformer.errors import RegistryError, StrategyError
from continual_transformer.registry import Registry


@pytest.fixture
def family(tmp_path, monkeypatch) -> Registry:
    """A registry with one class declared by a module on disk (``widget_module``), not imported yet."""
    registry: Registry = Registry("widget")
    holder = types.ModuleType("widget_holder")
    holder.registry = registry
    monkeypatch.setitem(sys.modules, "widget_holder", holder)
    (tmp_path / "widget_module.py").write_text(
        "from widget_holder import registry\n\n"
        "@registry.register('lazy_one', config_cls=dict)\n"
        "class LazyOne:\n"
        "    pass\n"
    )
    (tmp_path / "silent_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("widget_module", "silent_module"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    registry.declare("lazy_one", "widget_module")
    yield registry
    for name in ("widget_module", "silent_module"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("name", ["Bad", "bad-name", "1abc", "", "_x", "a b"])
def test_names_must_be_lower_case_identifiers(name):
    registry: Registry = Registry("widget")
    with pytest.raises(RegistryError, match="lower-case"):
        registry.register(name)
    with pytest.raises(RegistryError, match="lower-case"):
        registry.declare(name, "some.module")


def test_register_sets_name_and_config_class():
    registry: Registry = Registry("widget")

    @registry.register("good_name2", config_cls=dict)
    class Widget:
        pass

    assert registry.get("good_name2") is Widget
    assert Widget.name == "good_name2" and Widget.config_cls is dict
    assert "good_name2" in registry and registry.names() == ["good_name2"]


def test_duplicate_registration_is_refused():
    registry: Registry = Registry("widget")

    @registry.register("taken")
    class First:
        pass

    with pytest.raises(RegistryError, match="widget 'taken' is already registered by .*First"):
        registry.register("taken")(type("Second", (), {}))
    assert registry.get("taken") is First


def test_a_declared_name_cannot_be_taken_by_another_module():
    registry: Registry = Registry("widget")
    registry.declare("owned", "package.owner")
    with pytest.raises(RegistryError, match="already declared by module package.owner"):
        registry.declare("owned", "package.other")
    with pytest.raises(RegistryError, match="already declared by module package.owner"):
        registry.register("owned")(type("Intruder", (), {}))


def test_declared_entries_are_listed_without_import_and_imported_on_get(family):
    assert family.names() == ["lazy_one"] and "lazy_one" in family
    assert "widget_module" not in sys.modules
    cls = family.get("lazy_one")
    assert "widget_module" in sys.modules
    assert cls.__module__ == "widget_module" and cls.name == "lazy_one" and cls.config_cls is dict
    assert family.get("lazy_one") is cls
    assert family.load_all() == {"lazy_one": cls}


def test_a_module_that_does_not_register_its_name_is_reported(family):
    family.declare("ghost", "silent_module")
    with pytest.raises(RegistryError, match="declared by module silent_module, which did not register it"):
        family.get("ghost")


def test_unknown_name_lists_the_known_ones():
    registry: Registry = Registry("widget")
    registry.declare("beta", "m.beta")
    registry.register("alpha")(type("Alpha", (), {}))
    with pytest.raises(RegistryError, match=r"unknown widget 'gamma'; known: alpha, beta"):
        registry.get("gamma")


def test_a_family_can_raise_its_own_error_type():
    registry: Registry = Registry("strategy", error=StrategyError)
    with pytest.raises(StrategyError, match="unknown strategy 'x'"):
        registry.get("x")


def test_strategy_registry_declares_every_shipped_strategy_without_importing_them():
    code = (
        "import sys\n"
        "from continual_transformer.strategies import registry\n"
        "print(','.join(registry.names()))\n"
        "print(any(m.startswith('continual_transformer.strategies.') for m in sys.modules))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, strategy_modules, torch = out.stdout.split()
    expected = {
        "finetune",
        "in_context",
        "knowledge_store",
        "lora",
        "memory_bank",
        "none",
        "retrieval",
        "ttt",
    }
    assert expected <= set(names.split(","))
    assert (strategy_modules, torch) == ("False", "False")


def test_strategy_registry_get_imports_the_module_and_register_strategy_is_positional():
    from continual_transformer.strategies import register_strategy, registry

    cls = registry.get("none")
    assert cls.__module__ == "continual_transformer.strategies.none" and cls.name == "none"
    with pytest.raises(StrategyError, match="already registered"):
        register_strategy("none", dict)(type("OtherNone", (), {}))
    with pytest.raises(StrategyError, match="unknown strategy 'nope'; known: .*finetune"):
        registry.get("nope")


def test_base_classes_are_reachable_lazily():
    from continual_transformer.strategies import LearnReport, Strategy, StrategyStats
    from continual_transformer.strategies.base import LearnReport as Base

    assert (
        LearnReport is Base and Strategy.__name__ == "Strategy" and StrategyStats.__name__ == "StrategyStats"
    )
