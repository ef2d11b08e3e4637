"""Snapshot and rollback of the tensor-state parts (buffer, router, task table), without a model."""

from __future__ import annotations

import torch
from task_helpers import tiny_config

from continual_transformer.tasks.buffer import ReplayBuffer
from continual_transformer.tasks.prompts import Encoded
from continual_transformer.tasks.router import PrototypeRouter
from continual_transformer.tasks.table import TaskTable


def same_state(part, state) -> bool:
    now = part.state_tensors()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def test_a_snapshot_is_a_copy_and_rollback_returns_to_it():
    buffer = ReplayBuffer(capacity=4, max_tokens=3, seed=0)
    buffer.add([Encoded((1, 2), 0, 1)])
    router = PrototypeRouter(max_tasks=3, dim=2, labels_per_task=2)
    router.update(0, torch.ones(2, 2), torch.tensor([0, 1]))
    table = TaskTable(tiny_config())
    table.put("t0", ["a", "b"])
    parts = {"buffer": buffer, "router": router, "table": table}
    snapshots = {name: part.snapshot() for name, part in parts.items()}
    expected = {name: {k: v.clone() for k, v in part.state_tensors().items()} for name, part in parts.items()}

    buffer.add([Encoded((3,), 1, 0)] * 6)
    router.update(1, torch.randn(3, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 1]))
    table.put("t1", ["c", "d"])
    table.put("t0", ["e"])  # extends t0's labels
    for name, part in parts.items():
        assert not same_state(part, expected[name]), name  # the parts changed...
        assert all(torch.equal(snapshots[name][k], v) for k, v in expected[name].items())  # ...not the copies

    for name, part in parts.items():
        part.rollback(snapshots[name])
        assert same_state(part, expected[name]), name
    assert len(buffer) == 1 and buffer.example(0) == Encoded((1, 2), 0, 1)
    assert table.task_ids() == ["t0"] and table.label_set(0) == ("a", "b")  # the decoded cache follows
    assert router.route(torch.ones(1, 2)).tolist() == [0]
