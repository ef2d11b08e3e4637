"""The session: puts backbone, strategy and task learner together, owns their state, writes one checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fast_config, make_backbone
from safetensors.torch import save_file

from continual_transformer import ContinualTransformer
from continual_transformer.checkpoint import CONFIG_FILE, MANIFEST_FILE, TENSORS_FILE, read_tensors
from continual_transformer.config import dump_yaml
from continual_transformer.errors import CheckpointError, ConfigError
from continual_transformer.session import Session, resolve_config
from continual_transformer.tasks import TaskConfig

DOC = "The capital of Veloria is Tarnhelm."
PROBE = ["The capital of Veloria is"]
WORDS = [("capital", "Veloria", "Tarnhelm"), ("river", "Orvalis", "Quenmark")]


def tiny_tasks(**overrides) -> TaskConfig:
    settings = dict(
        max_tasks=4,
        max_labels_per_task=2,
        max_label_bytes=24,
        max_task_id_bytes=16,
        max_text_tokens=16,
        pool_size=2,
        adapter_dim=4,
        epochs=1,
        batch_size=8,
        buffer_size=8,
        transfer_samples=4,
        router_samples=8,
        router="backbone",
        router_layer=0,
    )
    return TaskConfig(**{**settings, **overrides})


def task_data() -> list[tuple[str, str]]:
    return [(" ".join(words), words[0]) for words in WORDS for _ in range(3)]


def config(**overrides):
    strategies = {
        "finetune": {
            "learning_rate": 1e-2,
            "epochs": 3,
            "stop_loss": 0.0,
            "window_tokens": 64,
            "context_tokens": 8,
        }
    }
    return fast_config(strategies=strategies, **overrides)


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread (see tests/tasks/task_helpers.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def session(tokenizer) -> Session:
    return Session(config(), backbone=make_backbone(tokenizer))


def test_session_resolves_its_config_against_the_strategies(session, tokenizer):
    assert session.strategy.name == "finetune" and session.config.model.name == "tiny-llama"
    assert session.config.strategies["finetune"]["optim"]["epochs"] == 3
    assert session.config.strategies["finetune"]["layers"] == "all"  # defaults filled in
    assert session.strategy.config.optim.epochs == 3
    with pytest.raises(ConfigError, match="strategies.finetune.optim.epochs: expected an integer"):
        Session(fast_config(strategies={"finetune": {"epochs": "many"}}), backbone=make_backbone(tokenizer))
    with pytest.raises(ConfigError, match="strategy: unknown strategy 'nope'"):
        Session(fast_config(strategy="nope"), backbone=make_backbone(tokenizer))


def test_building_a_session_leaves_the_global_random_state_alone(tokenizer):
    backbone = make_backbone(tokenizer)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    Session(config(seed=5, strategy="lora"), backbone=backbone)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_components_draw_the_same_numbers_as_under_a_global_seed(tokenizer):
    """The seed reaches what is built (here LoRA's initialisation) as ``torch.manual_seed`` used to."""
    from continual_transformer.strategies import registry, strategy_config

    cfg = resolve_config(config(seed=7, strategy="lora"))
    torch.manual_seed(cfg.seed)
    reference = registry.get("lora")(make_backbone(tokenizer), strategy_config(cfg), settings=cfg)
    expected = {k: v.clone() for k, v in reference.trainable_state().items()}
    reference.close()
    torch.manual_seed(999)
    built = Session(cfg, backbone=make_backbone(tokenizer))
    state = built.strategy.trainable_state()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def test_checkpoint_holds_one_part_per_component(session, tmp_path):
    from continual_transformer.documents import make_document

    session.learn(make_document(DOC, "veloria"))
    path = session.save(tmp_path / "state")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert list(manifest["parts"]) == ["strategy"], "no task part before tasks are used"
    assert manifest["parts"]["strategy"] == session.strategy.extra_state()
    assert manifest["base_model"]["fingerprint"] == session.backbone.fingerprint
    assert [h["doc_id"] for h in manifest["history"]] == ["veloria"]
    names = set(read_tensors(path))
    assert names == {f"strategy/{k}" for k in session.strategy.trainable_state()}

    assert session.tasks.tasks == []  # built, but holding no task: still no part
    session.save(tmp_path / "state")
    assert list(json.loads((path / MANIFEST_FILE).read_text())["parts"]) == ["strategy"]


def test_tasks_and_documents_round_trip_through_one_checkpoint(tokenizer, tmp_path):
    ct = ContinualTransformer(
        make_backbone(tokenizer), config=config(), task_config=tiny_tasks(), max_tasks=3
    )
    assert ct.config.tasks.max_tasks == 3 and ct.tasks.config.max_tasks == 3
    ct.learn_document(DOC)
    ct.learn_task("t0", task_data(), epochs=1)
    logits = ct.strategy.forward_logits(PROBE)
    predictions = [ct.predict(text, "t0") for text, _ in task_data()]
    path = ct.save(tmp_path / "state")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert sorted(manifest["parts"]) == ["strategy", "tasks"]
    assert manifest["parts"]["tasks"]["tasks"] == ["t0"]

    again = Session.from_checkpoint(path, backbone=make_backbone(tokenizer))
    assert again.config == ct.config
    assert torch.equal(again.strategy.forward_logits(PROBE), logits)
    assert again.tasks.tasks == ["t0"] and again.tasks.config.max_tasks == 3
    assert [again.predict(text, "t0") for text, _ in task_data()] == predictions


def test_foreign_base_model_is_refused_before_anything_changes(session, tokenizer, tmp_path):
    session.tasks.learn_task("t0", task_data(), epochs=1)
    session.save(tmp_path / "state")
    other = Session(config(), backbone=make_backbone(tokenizer, seed=1))
    logits = other.strategy.forward_logits(PROBE)
    with pytest.raises(CheckpointError, match="made on base model 'tiny-llama' \\(fingerprint"):
        other.load(tmp_path / "state")
    assert torch.equal(other.strategy.forward_logits(PROBE), logits)
    assert not other.has_tasks


def test_a_task_learner_checkpoint_is_not_a_session_checkpoint(session, tmp_path):
    session.tasks.learn_task("t0", task_data(), epochs=1)
    session.tasks.save(tmp_path / "learner")
    with pytest.raises(CheckpointError, match="holds strategy None"):
        session.load(tmp_path / "learner")


def test_unknown_parts_are_refused(session, tmp_path):
    path = session.save(tmp_path / "state")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["parts"]["hologram"] = {}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"parts \['hologram'\]"):
        session.load(path)


def test_format_version_1_checkpoints_still_load(tokenizer, tmp_path):
    """Checkpoints written before parts (strategy tensors unprefixed, task tensors under ``tasks/``) load."""
    ct = ContinualTransformer(make_backbone(tokenizer), config=config(), task_config=tiny_tasks())
    ct.learn_document(DOC)
    ct.learn_task("t0", task_data(), epochs=1)
    logits = ct.strategy.forward_logits(PROBE)
    predictions = [ct.predict(text, "t0") for text, _ in task_data()]

    old = tmp_path / "old"
    old.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in ct.strategy.trainable_state().items()}
    tensors.update({f"tasks/{k}": v.contiguous() for k, v in ct.tasks.state_tensors().items()})
    save_file(tensors, str(old / TENSORS_FILE))
    manifest = {
        "format": "continual-transformer-checkpoint",
        "format_version": 1,
        "library_version": "0.1.0",
        "strategy": "finetune",
        "base_model": {"name": "tiny-llama", "fingerprint": ct.backbone.fingerprint},
        "history": ct.history,
        "strategy_state": ct.strategy.extra_state(),
        "tasks": ct.tasks.checkpoint_manifest(),
    }
    (old / MANIFEST_FILE).write_text(json.dumps(manifest))
    (old / CONFIG_FILE).write_text(dump_yaml(ct.config))

    again = ContinualTransformer.from_checkpoint(old, model=make_backbone(tokenizer))
    assert torch.equal(again.strategy.forward_logits(PROBE), logits)
    assert [again.predict(text, "t0") for text, _ in task_data()] == predictions
    assert again.history == ct.history


def test_reset_forgets_documents_and_keeps_tasks(session):
    from continual_transformer.documents import make_document

    base = session.strategy.forward_logits(PROBE)
    session.learn(make_document(DOC, None))
    session.tasks.learn_task("t0", task_data(), epochs=1)
    session.reset()
    assert torch.equal(session.strategy.forward_logits(PROBE), base)
    assert session.history == [] and session.tasks.tasks == ["t0"]


def test_the_facade_is_a_view_of_its_session(tokenizer):
    ct = ContinualTransformer(make_backbone(tokenizer), config=config())
    assert ct.strategy is ct.session.strategy and ct.backbone is ct.session.backbone
    ct.learn_document(DOC)
    assert ct.history is ct.session.history and len(ct.history) == 1
    assert ContinualTransformer.from_session(ct.session).history is ct.history
    assert ct._tasks is None and ct.tasks is ct.session.tasks and ct._tasks is ct.tasks


def test_the_state_config_is_the_checkpoints_with_the_flags_over_it(session, tmp_path):
    from continual_transformer.session import state_config

    session.save(tmp_path / "state")
    cfg = state_config(tmp_path / "state")
    assert cfg == session.config, "the checkpoint's config applies without flags"
    changed = state_config(tmp_path / "state", set_items=["strategies.finetune.epochs=9", "seed=4"])
    from continual_transformer.strategies import strategy_config

    section = strategy_config(changed, "finetune")
    assert section.optim.epochs == 9 and changed.seed == 4
    assert section.optim.learning_rate == 1e-2, "the rest of the checkpoint's config stays"
    with pytest.raises(CheckpointError, match="made on base model 'tiny-llama', not 'other-model'"):
        state_config(tmp_path / "state", overrides={"model": {"name": "other-model"}})
    with pytest.raises(CheckpointError, match="holds strategy 'finetune', not 'lora'"):
        state_config(tmp_path / "state", overrides={"strategy": "lora"})
    reset = state_config(tmp_path / "state", overrides={"strategy": "lora"}, reset=True)
    assert reset.strategy == "lora" and reset.model.name == "smollm2-135m-instruct", "reset: defaults again"
    assert state_config(tmp_path / "none").strategy == "finetune"
    with pytest.raises(ConfigError, match="is a directory"):
        state_config(tmp_path / "none", config_file=tmp_path)
