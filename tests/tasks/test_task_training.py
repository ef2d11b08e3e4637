"""The one training loop and the seeding helper."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backbone
from task_helpers import single_thread, synthetic_task, tiny_config  # noqa: F401

from continual_transformer.backbone import Backbone
from continual_transformer.tasks import TaskLearner
from continual_transformer.tasks.prompts import TrainRow
from continual_transformer.tasks.training import fit, seeded


def test_seeded_draws_the_numbers_of_manual_seed_and_restores_the_generator():
    torch.manual_seed(5)
    reference = torch.randn(4)
    torch.manual_seed(99)
    before = torch.random.get_rng_state()
    with seeded(5, "cpu"):
        inside = torch.randn(4)
        layer = torch.nn.Linear(3, 2)  # nn initialisation draws from the same generator
    assert torch.equal(inside, reference)
    assert torch.equal(torch.random.get_rng_state(), before)  # nothing leaks out
    with seeded(5):
        torch.randn(4)
        assert torch.equal(torch.nn.Linear(3, 2).weight, layer.weight)


def test_fit_skips_steps_whose_gradient_is_not_finite(tokenizer):
    """A finite loss can still carry a nan gradient (a masked branch that overflowed): the weights stay
    finite."""
    backbone = make_backbone(tokenizer)
    weight = torch.nn.Parameter(torch.ones(3))
    rows = [TrainRow(prompt=(5, 6, 7), answer=(8,), task=0) for _ in range(4)]
    calls = []

    def step_loss(batch, chosen):
        calls.append(len(chosen))
        poisoned = len(calls) % 2 == 1  # every other step: the unselected branch's gradient is nan
        masked = torch.where(torch.tensor(False), torch.sqrt(weight - 10).sum(), torch.zeros(()))
        return (weight - 2).pow(2).sum() + (masked if poisoned else 0.0)

    losses = fit(backbone, [weight], rows, step_loss, epochs=2, batch_size=2, learning_rate=0.1)
    assert len(calls) == 4 and len(losses) == 2  # two steps skipped, two taken
    assert torch.isfinite(weight).all()
    assert (weight > 1).all()  # the steps taken moved the weights toward 2


def test_fit_without_host_syncs_matches_the_host_checked_loop(tokenizer, monkeypatch):
    """The GPU path (fused AdamW skipping non-finite steps on the device, losses read once) takes the same
    steps and gives the same weights and losses as the host-checked loop; forced here on the CPU."""
    from continual_transformer.tasks import training

    backbone = make_backbone(tokenizer)
    rows = [TrainRow(prompt=(5, 6, 7), answer=(8,), task=0) for _ in range(4)]

    def run(fused: bool) -> tuple[torch.Tensor, list[float]]:
        weight = torch.nn.Parameter(torch.ones(3))
        calls = []

        def step_loss(batch, chosen):
            calls.append(len(chosen))
            poisoned = len(calls) % 2 == 1
            masked = torch.where(torch.tensor(False), torch.sqrt(weight - 10).sum(), torch.zeros(()))
            return (weight - 2).pow(2).sum() + (masked if poisoned else 0.0)

        if fused:
            monkeypatch.setattr(
                training,
                "make_optimizer",
                lambda params, name, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True),
            )
        losses = fit(backbone, [weight], rows, step_loss, epochs=3, batch_size=2, learning_rate=0.1)
        return weight.detach().clone(), losses

    host_weight, host_losses = run(fused=False)
    device_weight, device_losses = run(fused=True)
    assert len(host_losses) == 3  # three of six steps skipped
    assert device_losses == host_losses
    assert torch.allclose(device_weight, host_weight, atol=1e-6)


@pytest.mark.parametrize("method", ["replay", "adapter_distill"])
def test_compiled_task_training_learns_what_the_eager_steps_learn_with_one_graph(
    tokenizer, monkeypatch, method
):
    """``tasks.compile`` (on a GPU; forced here): the training steps run the model compiled, and two tasks
    learn the weights, losses and predictions of the eager steps. Batches of other sizes and widths, the
    second task, and the slots' hooks used between steps (teachers, the router, scoring) compile nothing
    more: one graph; a batch of one row (the first task's last) runs uncompiled rather than compiling a graph
    of its own. (``aot_eager`` stands in for the GPU's compiler: the same tracing and guards.)"""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="aot_eager", **kw))
    monkeypatch.setattr(Backbone, "_compiles_varying", lambda self: True)
    torch._dynamo.reset()
    counters.clear()
    tasks = [synthetic_task(0, per_label=5), synthetic_task(1, per_label=3)]  # 10 rows: batches 3, 3, 3, 1

    def learn(compile: bool):
        config = tiny_config(method=method, compile=compile, share_prefix=False, batch_size=3, pool_size=1)
        learner = TaskLearner(make_backbone(tokenizer), config)
        reports = [learner.learn_task(f"t{i}", data, epochs=2) for i, data in enumerate(tasks)]
        predicted = [learner.predict(text) for data in tasks for text, _ in data]
        return learner.state_tensors(), reports, predicted

    eager_state, eager_reports, eager_predicted = learn(compile=False)
    assert not counters["stats"]["unique_graphs"]
    state, reports, predicted = learn(compile=True)
    assert counters["stats"]["unique_graphs"] == 1
    assert reports[1].merged == (method == "adapter_distill")  # the second task distilled into the slot
    for report, eager in zip(reports, eager_reports):
        assert report.final_loss == pytest.approx(eager.final_loss, rel=1e-4, abs=1e-5)
    assert state.keys() == eager_state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(
            tensor, eager_state[name], rtol=1e-3, atol=1e-4, msg=name
        )  # float sums reordered
    assert predicted == eager_predicted
