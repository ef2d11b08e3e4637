"""``isolation``: one adapter per task, never shared (the reference of what the pool's merges may cost)."""

from __future__ import annotations

import dataclasses

from continual_transformer.backbone import Backbone
from continual_transformer.tasks.config import TaskConfig
from continual_transformer.tasks.methods import registry
from continual_transformer.tasks.methods.adapter_distill import AdapterDistillMethod


@registry.register("isolation")
class IsolationMethod(AdapterDistillMethod):
    """``adapter_distill`` with a slot for every task (``max_tasks`` slots allocated up front): each task
    keeps the adapter it trained, so nothing is ever merged and nothing is forgotten. Same adapter shape,
    training and scoring as the pool; its size is ``max_tasks / pool_size`` times the pool's."""

    # Its bytes do not change from task to task: the max_tasks adapters are allocated at construction.
    grows_with_tasks = False

    def __init__(self, backbone: Backbone, config: TaskConfig) -> None:
        super().__init__(backbone, dataclasses.replace(config, pool_size=config.max_tasks))
