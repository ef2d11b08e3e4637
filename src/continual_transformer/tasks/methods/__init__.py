"""Continual-learning methods for classification tasks, all on one harness (:class:`TaskLearner`).

Every method owns its tensors, learns one task at a time through :func:`training.fit` (the one training loop),
and says which adapter weights serve a batch of rows (:meth:`TaskMethod.activate`). They share the frozen
backbone, generative scoring, the prompts and the router, so results differ only by the method.

==================  =======================================================================  ================
name                what it does                                                              grows per task
==================  =======================================================================  ================
adapter_distill     AdapterDistillation (Ermis et al., NeurIPS 2022): a fresh adapter per     no
                    task; when the fixed pool is full, it is distilled together with the
                    most transferable pool adapter into that slot (teachers: the new adapter
                    on the new task's data, the old one on its tasks' replay-buffer rows).
sequential          one shared adapter fine-tuned task after task (lower bound)               no
joint               one shared adapter trained on the union of all tasks so far (upper        yes (all data)
                    bound; keeps every example)
lora_per_task       one peft LoRA per task, selected by task id                               yes (one LoRA)
ewc                 shared adapter + online EWC penalty, diagonal Fisher (Kirkpatrick 2017)   no
lwf                 shared adapter + distillation to the previous adapter on new inputs       no
                    (Learning without Forgetting, Li & Hoiem 2017)
replay              shared adapter + fixed-size reservoir buffer mixed into every step        no
                    (experience replay, Chaudhry et al. 2019)
isolation           one pool adapter per task, never merged (reference for the pool's         yes (an adapter)
                    merges; slots preallocated for max_tasks)
==================  =======================================================================  ================

Methods are registered in :data:`registry` (a :class:`~continual_transformer.registry.Registry`): every
shipped method is declared here by module, so :func:`method_names` lists them without importing torch, and
:func:`get_method` imports a method's module the first time it is asked for. A new method subclasses
:class:`~.base.TaskMethod` and decorates itself with ``@register_task_method("name")``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from continual_transformer.registry import Registry

if TYPE_CHECKING:
    from continual_transformer.tasks.methods.base import TaskMethod

registry: Registry[type[TaskMethod]] = Registry("task method")
"""Every task method by name (lower-case identifiers, unique; errors are :class:`RegistryError`)."""

for _name, _module in {
    "adapter_distill": "adapter_distill",
    "sequential": "sequential",
    "joint": "joint",
    "lora_per_task": "lora_per_task",
    "ewc": "ewc",
    "lwf": "lwf",
    "replay": "replay",
    "isolation": "isolation",
}.items():
    registry.declare(_name, f"{__name__}.{_module}")

register_task_method = registry.register
"""Class decorator: ``@register_task_method("name")`` registers a :class:`TaskMethod` subclass."""


def method_names() -> list[str]:
    """Every task method's name, sorted (nothing is imported)."""
    return registry.names()


def get_method(name: str) -> type[TaskMethod]:
    """The method class registered as ``name`` (its module imported on first use)."""
    return registry.get(name)


def __getattr__(name: str) -> Any:
    # The contract lives in .base, which imports torch; it is loaded only when asked for, so that listing the
    # methods (config validation, ``ctt --help``) stays free of torch.
    if name in ("TaskMethod", "RowsOf"):
        from continual_transformer.tasks.methods import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RowsOf", "TaskMethod", "get_method", "method_names", "register_task_method", "registry"]
