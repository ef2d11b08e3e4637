"""The original API: learn_task / predict / evaluate / save / load, with a state that never grows."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backbone
from task_helpers import single_thread, synthetic_task, tiny_config  # noqa: F401

from continual_transformer.errors import CheckpointError, ConfigError
from continual_transformer.tasks import TaskConfig, TaskError, TaskLearner
from continual_transformer.tasks.buffer import ReplayBuffer
from continual_transformer.tasks.prompts import Encoded


def file_bytes(directory) -> int:
    return sum(path.stat().st_size for path in directory.glob("tensors-*.safetensors"))


def test_parameters_and_state_bytes_are_constant_and_distillation_runs(tokenizer, tmp_path):
    learner = TaskLearner(make_backbone(tokenizer), tiny_config(pool_size=2))
    sizes, files, reports = [], [], []
    for index in range(6):
        before = learner.method.pool.slot_up.clone()
        reports.append(learner.learn_task(f"task{index}", synthetic_task(index)))
        sizes.append((learner.num_parameters(), learner.state_bytes()))
        files.append(file_bytes(learner.save(tmp_path / f"after{index}")))
        if reports[-1].merged:  # distillation wrote the merged adapter into the chosen slot
            slot = reports[-1].slot
            assert not torch.equal(learner.method.pool.slot_up[slot], before[slot])
    assert len(set(sizes)) == 1, sizes  # parameters and bytes after task 6 == after task 1
    assert len(set(files)) == 1, files  # the checkpoint on disk does not grow either
    assert [r.merged for r in reports] == [False, False, True, True, True, True]
    assert int(learner.method.merges) == 4
    assert sorted(set(learner.method.slot_of_task[:6].tolist())) == [0, 1]  # 6 tasks share the 2 slots
    assert all(r.distill_seconds > 0 for r in reports[2:])
    assert learner.tasks == [f"task{i}" for i in range(6)]


def test_save_load_round_trip_gives_identical_predictions(tokenizer, tmp_path):
    backbone = make_backbone(tokenizer)
    learner = TaskLearner(backbone, tiny_config())
    for index in range(3):
        learner.learn_task(f"t{index}", synthetic_task(index))
    texts = [text for index in range(3) for text, _ in synthetic_task(index, per_label=2)]
    with_id = learner.predict_batch(texts, [f"t{i}" for i in range(3) for _ in range(4)])
    routed = learner.predict_batch(texts)
    scores = learner.scores(texts[:2], "t0")
    learner.save(tmp_path / "state")

    fresh = TaskLearner(
        backbone, TaskConfig(router="backbone")
    )  # another config: the checkpoint's own is restored
    fresh.load(tmp_path / "state")
    assert fresh.config == learner.config
    assert fresh.tasks == learner.tasks and fresh.labels("t1") == learner.labels("t1")
    assert fresh.predict_batch(texts, [f"t{i}" for i in range(3) for _ in range(4)]) == with_id
    assert fresh.predict_batch(texts) == routed
    for a, b in zip(fresh.scores(texts[:2], "t0"), scores):
        assert torch.equal(a, b)
    assert TaskLearner.from_checkpoint(backbone, tmp_path / "state").predict(texts[0], "t0") == with_id[0]


def test_checkpoint_from_another_base_model_is_refused(tokenizer, tmp_path):
    learner = TaskLearner(make_backbone(tokenizer, seed=0), tiny_config())
    learner.learn_task("t0", synthetic_task(0), epochs=1)
    learner.save(tmp_path / "state")
    other = TaskLearner(make_backbone(tokenizer, seed=1), tiny_config())
    with pytest.raises(CheckpointError, match="fingerprint"):
        other.load(tmp_path / "state")
    assert other.tasks == []  # nothing changed


def test_router_picks_the_right_task_on_separated_tasks(tokenizer):
    learner = TaskLearner(make_backbone(tokenizer), tiny_config())
    for index in range(3):
        learner.learn_task(f"t{index}", synthetic_task(index), epochs=1)
    for index in range(3):
        result = learner.evaluate_detailed(f"t{index}", synthetic_task(index, per_label=3), routed=True)
        assert result["router_accuracy"] == 1.0
    assert learner.route(["Veloria capital Tarnhelm", "lazy fox dog"]) == ["t0", "t2"]


def test_replay_buffer_stays_at_its_fixed_size():
    buffer = ReplayBuffer(capacity=8, max_tokens=5, seed=0)
    empty_bytes = sum(t.numel() * t.element_size() for t in buffer.state_tensors().values())
    for task in range(3):
        buffer.add([Encoded(tuple(range(1, 3 + n % 4)), task, n % 2) for n in range(10)])
        assert len(buffer) == 8
    assert int(buffer.seen) == 30
    assert sum(t.numel() * t.element_size() for t in buffer.state_tensors().values()) == empty_bytes
    assert (
        len({e.task for e in buffer.examples()}) >= 2
    )  # the reservoir keeps earlier tasks, not only the last
    assert all(e.text_ids == tuple(range(1, len(e.text_ids) + 1)) for e in buffer.examples())


def test_replay_method_state_is_constant(tokenizer):
    learner = TaskLearner(make_backbone(tokenizer), tiny_config(method="replay", buffer_size=6))
    sizes = []
    for index in range(3):
        learner.learn_task(f"t{index}", synthetic_task(index), epochs=1)
        sizes.append(learner.state_bytes())
        assert len(learner.method.buffer) == 6
    assert len(set(sizes)) == 1


def test_ewc_penalty_is_zero_at_the_anchor_and_positive_away(tokenizer):
    learner = TaskLearner(make_backbone(tokenizer), tiny_config(method="ewc", ewc_lambda=10.0))
    method = learner.method
    method.pool.fresh_scratch(seed=0)
    method.pool.store(0)  # anchor = the scratch adapter
    for fisher in method.fisher:
        fisher.copy_(torch.rand(fisher.shape) + 0.1)
    assert float(method.penalty().detach()) == 0.0
    with torch.no_grad():
        method.pool.up.add_(0.01)
    expected = 0.5 * 10.0 * float((method.fisher[2] * 0.01**2).sum())
    assert float(method.penalty()) == pytest.approx(expected, rel=1e-4)
    # The Fisher estimated after a task is non-negative and non-zero.
    learner.learn_task("t0", synthetic_task(0), epochs=1)
    assert all(float(f.min()) >= 0 for f in method.fisher) and sum(float(f.sum()) for f in method.fisher) > 0


def test_errors_name_the_problem(tokenizer):
    with pytest.raises(ConfigError, match="tasks.method"):
        TaskConfig(method="nope")
    with pytest.raises(ConfigError, match="tasks.prompt_template"):
        TaskConfig(prompt_template="no text here")
    learner = TaskLearner(make_backbone(tokenizer), tiny_config(max_tasks=2))
    with pytest.raises(TaskError, match="unknown task"):
        learner.predict("capital", "t0")
    learner.learn_task("t0", synthetic_task(0), epochs=1)
    learner.learn_task("t1", synthetic_task(1), epochs=1)
    with pytest.raises(TaskError, match="max_tasks=2"):
        learner.learn_task("t2", synthetic_task(2), epochs=1)
    with pytest.raises(TaskError, match="max_labels_per_task"):
        learner.learn_task("t0", [(f"text {i}", f"label{i}") for i in range(5)], epochs=1)
    assert learner.labels("t0") == tuple(
        label for _, label in synthetic_task(0)[:2]
    )  # unchanged by the failure


def test_task_level_router_on_single_vocabulary_tasks(tokenizer):
    from task_helpers import WORD_GROUPS

    learner = TaskLearner(make_backbone(tokenizer), tiny_config(router_prototypes="task"))
    assert learner.router.prototypes.shape == (8, 64)  # (max_tasks, dim), allocated up front
    for index in range(3):
        words = WORD_GROUPS[index]
        data = [(f"{words[n % 3]} {words[(n + 1) % 3]}", f"label{n % 2}") for n in range(8)]
        learner.learn_task(f"t{index}", data, epochs=1)
    queries = [f"{WORD_GROUPS[i][2]} {WORD_GROUPS[i][0]} {WORD_GROUPS[i][1]}" for i in range(3)]
    assert learner.route(queries) == ["t0", "t1", "t2"]


def test_evaluate_many_equals_one_evaluation_per_task(tokenizer):
    learner = TaskLearner(make_backbone(tokenizer), tiny_config())
    learner.learn_task("t0", synthetic_task(0), epochs=2)
    learner.learn_task("t1", synthetic_task(1), epochs=2)
    unseen = synthetic_task(2, per_label=2)
    labels = tuple(dict.fromkeys(label for _, label in unseen))
    items = [("t0", synthetic_task(0, 3), None), ("t1", synthetic_task(1, 3), None), ("t2", unseen, labels)]
    single = [learner.evaluate(t, d, labels=labels) for t, d, labels in items]
    assert learner.evaluate_many(items) == single


def test_routed_evaluation_of_many_tasks_equals_one_per_task(tokenizer):
    learner = TaskLearner(make_backbone(tokenizer), tiny_config(pool_size=1))
    for index in range(3):
        learner.learn_task(f"t{index}", synthetic_task(index), epochs=2)
    items = [(f"t{index}", synthetic_task(index, per_label=3)) for index in range(3)]
    single = [learner.evaluate_detailed(t, d, routed=True) for t, d in items]
    many = learner.evaluate_routed_many(items)
    assert [m["accuracy"] for m in many] == [s["accuracy"] for s in single]
    assert [m["router_accuracy"] for m in many] == pytest.approx([s["router_accuracy"] for s in single])


def test_facade_checkpoint_carries_documents_and_tasks_together(tokenizer, tmp_path):
    from conftest import fast_config

    from continual_transformer import ContinualTransformer

    ct = ContinualTransformer(
        make_backbone(tokenizer), config=fast_config(), task_config=tiny_config(), max_tasks=8
    )
    ct.learn_document("The capital of Veloria is Tarnhelm.")
    for index in range(3):
        ct.learn_task(f"t{index}", synthetic_task(index), epochs=1)
    texts = [text for index in range(3) for text, _ in synthetic_task(index, per_label=2)]
    with_id = [ct.predict(text, f"t{i // 4}") for i, text in enumerate(texts)]
    routed = [ct.predict(text) for text in texts]
    logits = ct.strategy.forward_logits(["The capital of Veloria is"])
    ct.save(tmp_path / "state")

    again = ContinualTransformer.from_checkpoint(tmp_path / "state", model=make_backbone(tokenizer))
    assert again.tasks.tasks == ["t0", "t1", "t2"] and again.tasks.config.max_tasks == 8
    assert [again.predict(text, f"t{i // 4}") for i, text in enumerate(texts)] == with_id
    assert [again.predict(text) for text in texts] == routed
    assert torch.equal(again.strategy.forward_logits(["The capital of Veloria is"]), logits)

    # A checkpoint without tasks leaves none behind; one from another base model changes nothing.
    plain = ContinualTransformer(make_backbone(tokenizer), config=fast_config())
    plain.save(tmp_path / "plain")
    again.load(tmp_path / "plain")
    assert again._tasks is None
    other = ContinualTransformer(
        make_backbone(tokenizer, seed=1), config=fast_config(), task_config=tiny_config()
    )
    with pytest.raises(CheckpointError, match="base model"):
        other.load(tmp_path / "state")
    assert other._tasks is None


def test_router_on_a_sentence_embedder_routes_and_round_trips(tokenizer, tmp_path):
    """``router`` naming a sentence encoder (here a tiny random BERT) feeds its embeddings to the
    prototypes."""
    from conftest import save_tiny_embedder
    from task_helpers import WORD_GROUPS

    texts = [" ".join(group) for group in WORD_GROUPS]
    encoder = save_tiny_embedder(tmp_path / "encoder", texts)
    learner = TaskLearner(make_backbone(tokenizer), tiny_config(router=str(encoder)))
    assert learner.embedder.dim == 32 and learner.router.prototypes.shape[-1] == 32  # the encoder's width
    for index in range(3):
        learner.learn_task(f"t{index}", synthetic_task(index), epochs=1)
    for index in range(3):
        assert (
            learner.evaluate_detailed(f"t{index}", synthetic_task(index, per_label=3), routed=True)[
                "router_accuracy"
            ]
            == 1.0
        )
    queries = [text for text, _ in synthetic_task(1, per_label=2)]
    routed = learner.route(queries)
    learner.save(tmp_path / "ckpt")
    fresh = TaskLearner(make_backbone(tokenizer), tiny_config())
    fresh.load(tmp_path / "ckpt")
    assert fresh.config.router == str(encoder) and fresh.route(queries) == routed == ["t1"] * len(queries)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_backbone_router_stops_at_its_layer_and_embeds_as_the_full_pass(tokenizer, arch):
    from conftest import make_backbone

    from continual_transformer.tasks.router import BackboneEmbedder

    backbone = make_backbone(tokenizer, arch=arch)
    texts = ["The capital of Veloria is Tarnhelm.", "fox", "What is the capital of France? Paris."]
    calls = []
    last = backbone.layers[-1].register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        for layer in (1, 2):
            embedder = BackboneEmbedder(backbone, layer=layer, max_tokens=16, batch_size=2)
            early = embedder(texts)
            assert not calls, "the layers after the router's are not run"
            full = embedder.embed_through_last_layer(texts)
            assert calls
            calls.clear()
            assert early.shape == (3, embedder.dim)
            assert torch.allclose(early, full, atol=1e-6)
    finally:
        last.remove()
    left = [
        h for layer in backbone.layers for h in layer._forward_hooks.values() if "_early" in h.__qualname__
    ]
    assert not left, "no stopping hook outlives a call"
