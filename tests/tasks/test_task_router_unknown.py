"""Unknown-task scores of the prototype router: what each score flags, the running covariance against the
batch one, the conformal calibration, and state that old checkpoints lack."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_backbone
from task_helpers import WORD_GROUPS, single_thread, synthetic_task, tiny_config, write_clinc  # noqa: F401

from continual_transformer.config import to_dict
from continual_transformer.errors import ConfigError
from continual_transformer.tasks import (
    UNKNOWN_TASK,
    TaskBenchmarkSettings,
    TaskConfig,
    TaskError,
    TaskLearner,
)
from continual_transformer.tasks import config as task_config
from continual_transformer.tasks.bench import runner
from continual_transformer.tasks.bench.runner import auroc
from continual_transformer.tasks.learner import saved_task_config
from continual_transformer.tasks.router import (
    COVARIANCE_SCORES,
    UNKNOWN_SCORES,
    PrototypeRouter,
    flagged_for_confidence,
)

DIM = 6
# Each label's examples spread wide along its own axis and barely across the others.
SPREAD = torch.tensor([3.0, 0.2, 0.2, 0.2, 0.2, 0.2])


def clusters(generator: torch.Generator, per_label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tasks of two labels: label centres 10 apart on the axes after the first, the same elongated
    spread."""
    centres = torch.zeros(4, DIM)
    centres[torch.arange(4), torch.arange(1, 5)] = 10.0
    labels = torch.arange(4).repeat_interleave(per_label)
    return centres[labels] + torch.randn(labels.numel(), DIM, generator=generator) * SPREAD, labels


def fitted_router(score: str, per_label: int = 200, shrinkage: float = 0.0) -> PrototypeRouter:
    router = PrototypeRouter(2, DIM, 2, unknown_score=score, shrinkage=shrinkage)
    x, y = clusters(torch.Generator().manual_seed(0), per_label)
    for task in range(2):
        mine = (y // 2) == task
        router.update(task, x[mine], y[mine] % 2)
    return router


@pytest.mark.parametrize("score", UNKNOWN_SCORES)
def test_every_score_flags_a_far_cluster_and_not_new_points_of_the_learned_ones(score):
    router = fitted_router(score)
    held_out, _ = clusters(torch.Generator().manual_seed(1), 50)
    router.calibrate(held_out, 0.02, confidence=None)
    test, labels = clusters(torch.Generator().manual_seed(2), 100)
    far = torch.randn(100, DIM, generator=torch.Generator().manual_seed(3)) * SPREAD - 10.0
    assert bool((router.route_or_unknown(far) == -1).all())
    routed = router.route_or_unknown(test)
    assert float((routed == -1).float().mean()) <= 0.05
    kept = routed >= 0
    assert torch.equal(routed[kept], (labels // 2)[kept])  # the rest go to their own task


def test_mahalanobis_follows_the_spread_that_euclidean_ignores():
    """Two points as far from a prototype in Euclidean terms: along the labels' wide axis (in scope) and
    across it (out of scope). Only the covariance scores tell them apart."""
    along, across = torch.zeros(2, DIM), torch.zeros(2, DIM)
    along[:, 1], across[:, 1] = 10.0, 10.0
    along[:, 0] = torch.tensor([3.0, -3.0])
    across[:, 2] = torch.tensor([3.0, -3.0])  # towards another label: the whole data spread there too
    for score in UNKNOWN_SCORES:
        router = fitted_router(score)
        scores_along, scores_across = router.unknown_scores(along), router.unknown_scores(across)
        if score in COVARIANCE_SCORES:
            assert bool((scores_along > scores_across + 50).all()), score
        else:
            # the pair's mean cancels the prototype's estimation error along the wide axis
            gap = float(scores_along.mean() - scores_across.mean())
            assert abs(gap) < 0.05 * float(scores_across.abs().mean()), score


@pytest.mark.parametrize("per_label", [True, False])
def test_running_scatter_equals_the_batch_scatter_about_the_prototypes(per_label):
    generator = torch.Generator().manual_seed(5)
    router = PrototypeRouter(3, DIM, 4 if per_label else None, unknown_score="mahalanobis", shrinkage=0.0)
    everything: list[tuple[torch.Tensor, torch.Tensor]] = []
    for task, size in [(0, 7), (1, 5), (0, 11), (2, 1), (1, 9), (0, 3)]:  # tasks come back with more
        x = torch.randn(size, DIM, generator=generator) * 2 + task
        y = torch.randint(0, 4, (size,), generator=generator)
        router.update(task, x, y if per_label else None)
        everything.append((x.double(), task * 4 + (y if per_label else torch.zeros_like(y))))
    x = torch.cat([e[0] for e in everything])
    group = torch.cat([e[1] for e in everything])
    reference = torch.zeros(DIM, DIM, dtype=torch.float64)
    for g in group.unique():
        centred = x[group == g] - x[group == g].mean(0)
        reference += centred.T @ centred
    torch.testing.assert_close(router.scatter.double(), reference, rtol=1e-5, atol=1e-4)
    dof = x.shape[0] - group.unique().numel()
    torch.testing.assert_close(router.covariance(), reference / dof, rtol=1e-5, atol=1e-4)


def test_calibration_flags_the_asked_share_of_its_own_texts():
    router = fitted_router("euclidean")
    held_out, _ = clusters(torch.Generator().manual_seed(1), 250)  # 1,000 texts
    scores = router.unknown_scores(held_out)
    for rate in (0.01, 0.02, 0.1):
        threshold = router.calibrate(held_out, rate, confidence=None)
        assert int((scores < threshold).sum()) == int(rate * 1000)
        threshold = router.calibrate(held_out, rate, confidence=0.9)
        flagged = int((scores < threshold).sum())
        assert flagged == flagged_for_confidence(1000, rate, 0.9) < rate * 1000
    router.calibrate(held_out, 0.0)
    assert not bool((router.route_or_unknown(held_out) == -1).any())


def test_the_conformal_bound_holds_on_new_draws_of_the_same_distribution():
    """Uniform scores: the share of new draws a threshold flags is the threshold itself. Over many
    calibration sets the realised share exceeds the rate at most about 1 - confidence of the time; the
    empirical quantile exceeds it about half the time."""
    n, rate, confidence, trials = 300, 0.05, 0.9, 2000
    draws = torch.rand(trials, n, generator=torch.Generator().manual_seed(0)).sort(-1).values
    k = flagged_for_confidence(n, rate, confidence)
    over = float((draws[:, k] > rate).float().mean())
    assert over <= 1 - confidence + 0.02
    assert float((draws[:, int(rate * n)] > rate).float().mean()) > 0.35
    assert flagged_for_confidence(n, rate, 0.99) < k < flagged_for_confidence(n, rate, 0.5)
    assert flagged_for_confidence(10, 0.02, 0.9) == -1  # too few texts to bound 2 %


def test_state_round_trip_and_an_old_state_without_the_new_tensors():
    router = fitted_router("mahalanobis", shrinkage=0.3)
    held_out, _ = clusters(torch.Generator().manual_seed(1), 50)
    router.calibrate(held_out, 0.05)
    probe, _ = clusters(torch.Generator().manual_seed(4), 20)
    copy = PrototypeRouter(2, DIM, 2, unknown_score="mahalanobis", shrinkage=0.3)
    copy.load_state_tensors({k: v.clone() for k, v in router.state_tensors().items()})
    assert torch.equal(copy.route_or_unknown(probe), router.route_or_unknown(probe))
    assert torch.equal(copy.unknown_scores(probe), router.unknown_scores(probe))

    old = {"prototypes": router.prototypes.clone(), "counts": router.counts.clone()}  # before detection
    for score in UNKNOWN_SCORES:
        restored = PrototypeRouter(2, DIM, 2, unknown_score=score)
        restored.load_state_tensors(old)
        assert restored.unknown_threshold == float("-inf")
        assert torch.equal(restored.route(probe), router.route(probe))
        if score in COVARIANCE_SCORES:
            with pytest.raises(TaskError, match="no covariance statistics"):
                restored.unknown_scores(probe)
        else:
            restored.calibrate(held_out, 0.05)
    assert "scatter" not in PrototypeRouter(2, DIM, 2, unknown_score="euclidean").state_tensors()
    with pytest.raises(ValueError, match="scatter"):
        copy.load_state_tensors({**router.state_tensors(), "scatter": torch.zeros(DIM + 1, DIM + 1)})


def test_a_checkpoint_from_before_the_setting_keeps_the_cosine_score():
    manifest = {"task_config": {"max_tasks": 4}}
    assert saved_task_config(manifest).router_unknown_score == "cosine"
    manifest["task_config"]["router_unknown_score"] = "mahalanobis"
    assert saved_task_config(manifest).router_unknown_score == "mahalanobis"


def test_config_defaults_validate_and_the_scores_stay_in_step():
    assert TaskConfig().router_unknown_score in UNKNOWN_SCORES
    assert task_config.UNKNOWN_SCORES == UNKNOWN_SCORES
    for bad in (
        {"router_unknown_score": "energy"},
        {"router_covariance_shrinkage": 1.5},
        {"router_unknown_confidence": 1.0},
    ):
        with pytest.raises(ConfigError, match="tasks.router_"):
            TaskConfig(**bad)


def test_auroc_counts_ties_half():
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert math.isclose(auroc(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0])), (0.5 + 0 + 1 + 1) / 4)


@pytest.mark.parametrize("score", ["euclidean", "relative_mahalanobis"])
def test_the_learner_flags_foreign_texts_with_the_configured_score_across_a_checkpoint(
    tokenizer, tmp_path, score
):
    config = tiny_config(router_unknown_score=score, router_unknown_confidence=None)
    learner = TaskLearner(make_backbone(tokenizer), config)
    for k in range(2):
        learner.learn_task(f"t{k}", synthetic_task(k, per_label=6))
    held_out = [text for k in range(2) for text, _ in synthetic_task(k, per_label=3)]
    learner.calibrate_unknown(held_out, false_alarm_rate=0.0)
    assert UNKNOWN_TASK not in learner.predict_batch(held_out, allow_unknown=True)
    foreign = [" ".join(WORD_GROUPS[g]) for g in (6, 7)] + ["questions memory degrees", "answers learning"]
    flagged = learner.route(foreign, allow_unknown=True)
    assert flagged.count(UNKNOWN_TASK) >= len(foreign) // 2
    learner.save(tmp_path / "state")
    restored = TaskLearner.from_checkpoint(make_backbone(tokenizer), tmp_path / "state")
    assert restored.config.router_unknown_score == score
    assert restored.route(foreign, allow_unknown=True) == flagged


def test_the_task_benchmark_measures_detection_with_the_configured_score(tokenizer, tmp_path):
    write_clinc(tmp_path / "data")
    data_file = tmp_path / "data" / "clinc150" / "data_full.json"
    rows = json.loads(data_file.read_text(encoding="utf-8"))
    foreign = [" ".join(WORD_GROUPS[g]) for g in (6, 7)] + ["questions memory degrees", "answers learning"]
    rows["oos_test"] = [[text, "oos"] for text in foreign]
    data_file.write_text(json.dumps(rows), encoding="utf-8")
    settings = TaskBenchmarkSettings(
        data_dir=str(tmp_path / "data"),
        max_train_per_label=2,  # the third training text of each intent is held out for calibration
        unknown_false_alarm_rate=0.0,
        learner=tiny_config(epochs=1, router_unknown_score="mahalanobis"),
    )
    tasks = runner.suite_tasks("clinc150-10", settings)
    learner = TaskLearner(make_backbone(tokenizer), settings.learner)
    for task in tasks:
        learner.learn_task(task.name, [(e.text, e.label) for e in task.train], labels=task.labels)
    result = runner.unknown_task_detection(learner, "clinc150-10", tasks, settings)
    assert result["score"] == "mahalanobis" and result["calibration_texts"] == 6
    in_scope = [e.text for t in tasks for e in t.test]
    flagged_in = learner.route(in_scope, allow_unknown=True).count(UNKNOWN_TASK)  # what predict would do
    flagged_oos = learner.route(foreign, allow_unknown=True).count(UNKNOWN_TASK)
    assert result["false_alarm_rate"] == flagged_in / len(in_scope)
    assert result["recall"] == flagged_oos / len(foreign)
    assert 0.0 <= result["auroc"] <= 1.0


def test_one_example_per_label_measures_no_spread_and_falls_back_to_the_euclidean_distance():
    router = PrototypeRouter(1, DIM, 2, unknown_score="mahalanobis", shrinkage=0.0)
    router.update(0, torch.eye(DIM)[:2] * 5, torch.tensor([0, 1]))
    assert not bool(router.scatter.any())
    probe = torch.randn(4, DIM, generator=torch.Generator().manual_seed(0))
    expected = -torch.cdist(probe, torch.eye(DIM)[:2] * 5).square().min(-1).values
    torch.testing.assert_close(router.unknown_scores(probe), expected, rtol=1e-5, atol=1e-4)


def test_an_old_learner_checkpoint_loads_with_the_cosine_threshold_it_was_calibrated_with(
    tokenizer, tmp_path
):
    learner = TaskLearner(make_backbone(tokenizer), tiny_config(router_unknown_score="cosine"))
    for k in range(2):
        learner.learn_task(f"t{k}", synthetic_task(k, per_label=6))
    held_out = [t for k in range(2) for t, _ in synthetic_task(k, per_label=3)]
    learner.calibrate_unknown(held_out, false_alarm_rate=0.1)
    foreign = [" ".join(WORD_GROUPS[g]) for g in (6, 7)] + ["questions memory degrees", "answers learning"]
    flagged = learner.route(foreign + held_out, allow_unknown=True)
    assert 0 < flagged.count(UNKNOWN_TASK) < len(flagged)
    learner.save(tmp_path / "state")
    manifest_file = tmp_path / "state" / "manifest.json"
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    del manifest["task_config"]["router_unknown_score"]  # as written before the setting existed
    manifest_file.write_text(json.dumps(manifest), encoding="utf-8")
    restored = TaskLearner(make_backbone(tokenizer), tiny_config())  # built with the new default score
    restored.load(tmp_path / "state")
    assert restored.config.router_unknown_score == "cosine"
    assert restored.route(foreign + held_out, allow_unknown=True) == flagged


def _elongated(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tasks of one label each, spread wide along x and narrow along y: task 0 around (0, 0), task 1
    around (6, 3). Nearness in plain distance follows x, which says little; y tells the tasks apart."""
    task = torch.arange(2).repeat_interleave(n)
    centre = torch.tensor([[0.0, 0.0], [6.0, 3.0]])[task]
    return centre + torch.randn(2 * n, 2, generator=generator) * torch.tensor([5.0, 0.5]), task


def test_lda_rule_routes_by_the_shared_covariance_where_cosine_cannot():
    """The lda rule routes by Mahalanobis distance under the covariance kept as running statistics: on
    elongated clusters it picks the right task where the centred cosine rule cannot; the same statistics
    survive a state round trip, and a state without them is refused with the setting to change."""
    x, task = _elongated(torch.Generator().manual_seed(0), 400)
    test, truth = _elongated(torch.Generator().manual_seed(1), 200)
    routers = {
        rule: PrototypeRouter(2, 2, 1, unknown_score="euclidean", rule=rule, rule_shrinkage=0.0)
        for rule in ("cosine", "lda")
    }
    for router in routers.values():
        for k in range(2):
            router.update(k, x[task == k], torch.zeros(int((task == k).sum()), dtype=torch.long))
    accuracy = {rule: float((r.route(test) == truth).float().mean()) for rule, r in routers.items()}
    assert accuracy["lda"] > 0.95 and accuracy["cosine"] < 0.85, accuracy
    lda = routers["lda"]
    restored = PrototypeRouter(2, 2, 1, unknown_score="euclidean", rule="lda", rule_shrinkage=0.0)
    restored.load_state_tensors({k: v.clone() for k, v in lda.state_tensors().items()})
    assert torch.equal(restored.route(test), lda.route(test))
    old = {k: v for k, v in lda.state_tensors().items() if k != "scatter"}  # from before the statistics
    stale = PrototypeRouter(2, 2, 1, unknown_score="euclidean", rule="lda")
    stale.load_state_tensors(old)
    with pytest.raises(TaskError, match="tasks.router_rule=cosine"):
        stale.route(test)


def test_a_checkpoint_from_before_the_lda_rule_routes_as_it_did():
    manifest = {"task_config": to_dict(TaskConfig())}
    del manifest["task_config"]["router_rule"]
    assert saved_task_config(manifest).router_rule == "cosine"
    assert TaskConfig().router_rule in task_config.ROUTE_RULES
    with pytest.raises(ConfigError, match="tasks.router_rule"):
        TaskConfig(router_rule="knn")
