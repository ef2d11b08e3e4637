"""The task-method registry: every shipped method declared lazily, the same name rules and errors as
strategies."""

from __future__ import annotations

import pytest

from continual_transformer.errors import RegistryError
from continual_transformer.tasks import methods
from continual_transformer.tasks.methods.base import TaskMethod

SHIPPED = ["adapter_distill", "ewc", "isolation", "joint", "lora_per_task", "lwf", "replay", "sequential"]


def test_every_shipped_method_is_declared_and_loads_under_its_name():
    assert methods.method_names() == SHIPPED
    classes = methods.registry.load_all()
    assert list(classes) == SHIPPED
    for name, cls in classes.items():
        assert issubclass(cls, TaskMethod) and cls.name == name
        assert cls.__module__.startswith("continual_transformer.tasks.methods.")
    assert methods.get_method("ewc") is classes["ewc"]
    assert methods.TaskMethod is TaskMethod  # the contract, loaded on first use


def test_unknown_and_malformed_names_are_registry_errors_that_list_the_known_ones():
    with pytest.raises(RegistryError, match=r"unknown task method 'nope'; known: adapter_distill, ewc"):
        methods.get_method("nope")
    with pytest.raises(RegistryError, match="lower-case"):
        methods.register_task_method("Bad-Name")
    with pytest.raises(ValueError):  # RegistryError is a ValueError, as before
        methods.register_task_method("1st")


def test_a_name_cannot_be_taken_twice():
    with pytest.raises(RegistryError, match="'sequential' is already registered by SequentialMethod"):

        @methods.register_task_method("sequential")
        class Impostor(TaskMethod):
            pass

    assert methods.get_method("sequential").__name__ == "SequentialMethod"  # unchanged
