"""Checkpoints hold what learning changed: deltas against the base weights, bit-exact, and saves that write
only the files whose content changed."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tokenizer, fast_config, make_backbone

from continual_transformer.checkpoint import read_manifest
from continual_transformer.documents import make_document
from continual_transformer.session import Session
from continual_transformer.strategies.base import apply_delta_state, delta_state

DOC = "The capital of Veloria is Tarnhelm. The Orvalis river flows through Quenmark."


def test_delta_state_round_trips_bit_exactly_and_stores_only_changes():
    torch.manual_seed(0)
    base = {
        "same": torch.randn(6, 4),
        "rows": torch.randn(8, 4),
        "cols": torch.randn(4, 8),
        "dense": torch.randn(5, 3),
        "signed_zero": torch.zeros(4, 4),
        "vector": torch.randn(10),
        "scalar": torch.tensor(1.0),
        "half": torch.randn(6, 4).to(torch.bfloat16),
    }
    current = {k: v.clone() for k, v in base.items()}
    current["rows"][[1, 5]] += 0.5
    current["cols"][:, 2] -= 1.0
    current["dense"] += 1e-3
    current["signed_zero"][0, 0] = -0.0  # equal as numbers, not as bits
    current["vector"][3] = float("nan")
    current["scalar"] += 1
    current["half"][0] += 1
    state = delta_state(current, base)
    assert "same" not in state and "same@rows" not in state
    assert state["rows@rows"].tolist() == [1, 5] and state["rows@row_values"].shape == (2, 4)
    assert state["cols@cols"].tolist() == [2] and state["cols@col_values"].shape == (4, 1)
    assert "dense" in state and "scalar" in state and "signed_zero@rows" in state
    stored = sum(t.numel() * t.element_size() for t in state.values())
    assert stored < sum(t.numel() * t.element_size() for t in current.values()) / 2
    full = apply_delta_state(state, base, "test")
    for name, tensor in current.items():
        assert torch.equal(full[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), (
            name
        )
    with pytest.raises(ValueError, match="unexpected"):
        apply_delta_state({**state, "foreign": torch.zeros(1)}, base, "test")
    with pytest.raises(ValueError, match="does not fit"):
        apply_delta_state({"rows@rows": torch.tensor([9]), "rows@row_values": torch.zeros(1, 4)}, base, "t")


@pytest.mark.parametrize("group_values", [1, 40, 1 << 26])
def test_delta_state_reads_its_decisions_once_per_group_and_stores_what_per_tensor_calls_store(
    monkeypatch, group_values
):
    """Tensors are compared with their base in groups, one read of the counts per group; whatever the
    grouping, the state is the one each tensor alone gives (empty tensors and scalars included)."""
    import continual_transformer.strategies.base as base_module

    torch.manual_seed(1)
    base = {
        "rows": torch.randn(8, 4),
        "cols": torch.randn(4, 8),
        "dense": torch.randn(5, 3),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.0),
        "same": torch.randn(3),
        "cube": torch.randn(2, 3, 4),
    }
    current = {k: v.clone() for k, v in base.items()}
    current["rows"][6] += 1
    current["cols"][:, [0, 7]] *= 2
    current["dense"] -= 0.25
    current["scalar"] += 1
    current["cube"][1, 2, 3] = 0.5
    alone = {}
    for name in base:
        alone.update(delta_state({name: current[name]}, {name: base[name]}, bits=8))
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(base_module, "_GROUP_VALUES", group_values)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or tolist(t))
    state = delta_state(current, base, bits=8)
    assert len(reads) == len(base_module._groups(current))
    assert len(reads) == {1: 6, 40: 4, 1 << 26: 1}[group_values]  # an empty tensor joins any group
    assert state.keys() == alone.keys()
    for key in state:
        assert torch.equal(state[key], alone[key]), key
    assert "empty" not in state and "same" not in state and "cube@rows" in state and "dense@q8" in state


FAST_FINETUNE = {
    "learning_rate": 1e-2,
    "epochs": 20,
    "stop_loss": 0.0,
    "window_tokens": 64,
    "context_tokens": 8,
}


def session(strategy: str, **settings) -> Session:
    config = fast_config(strategy=strategy)
    if settings:
        fast = FAST_FINETUNE if strategy == "finetune" else {}
        config = fast_config(strategy=strategy, strategies={strategy: {**fast, **settings}})
    return Session(config, backbone=make_backbone(build_tokenizer()))


def tensor_bytes_on_disk(path) -> int:
    return read_manifest(path)["tensors"]["bytes"]


@pytest.mark.parametrize("strategy", ["finetune", "ttt"])
def test_an_unlearned_model_saves_no_trained_weights_and_a_changed_one_reloads_exactly(strategy, tmp_path):
    s = session(strategy)
    s.save(tmp_path / "empty")
    whole = sum(p.numel() * p.element_size() for p in s.strategy.trainable_parameters().values())
    assert tensor_bytes_on_disk(tmp_path / "empty") < whole / 100, "nothing learned: no weights stored"
    s.learn(make_document(DOC, "d"))
    s.save(tmp_path / "learned")
    fresh = session(strategy)
    fresh.load(tmp_path / "learned")
    probe = ["Where does the Orvalis flow?"]
    assert torch.equal(fresh.strategy.forward_logits(probe), s.strategy.forward_logits(probe))


def test_sparse_ttt_stores_only_the_updated_neurons(tmp_path):
    s = session("ttt", sparse=True, trainable_neurons=8)
    s.learn(make_document(DOC, "d"))
    whole = sum(p.numel() * p.element_size() for p in s.strategy.trainable_parameters().values())
    s.save(tmp_path / "state")
    assert tensor_bytes_on_disk(tmp_path / "state") < whole / 2
    fresh = session("ttt", sparse=True, trainable_neurons=8)
    fresh.load(tmp_path / "state")
    probe = ["Where does the Orvalis flow?"]
    assert torch.equal(fresh.strategy.forward_logits(probe), s.strategy.forward_logits(probe))


def test_a_save_after_one_more_document_writes_only_changed_files(tmp_path):
    s = session("finetune", layers="-1:")
    s.learn(make_document(DOC, "d1"))
    path = s.save(tmp_path / "state")
    before = {p.name for p in path.iterdir()}
    s.save(path)  # nothing changed: no tensor file written
    assert {p.name for p in path.iterdir()} == before
    s.learn(make_document("Another fact: the Quenmark bell rings twice.", "d2"))
    s.save(path)
    new = {p.name for p in path.iterdir()} - before
    assert new and all(name.startswith("tensors-") for name in new)


@pytest.mark.parametrize("bits", [8, 4])
def test_dense_changes_are_stored_as_codes_within_half_a_step(bits):
    torch.manual_seed(0)
    base = {"odd": torch.randn(6, 7), "wide": torch.randn(4, 64), "vector": torch.randn(5)}
    current = {k: v + 1e-3 * torch.randn_like(v) for k, v in base.items()}
    current["wide"][2] = base["wide"][2]  # a row that did not change: scale 0, codes 0
    state = delta_state(current, base, bits=bits)
    code = f"@q{bits}"
    assert {"odd" + code, "odd@scale", "wide" + code, "wide@scale", "vector"} == set(state)
    assert state["wide@scale"][2].item() == 0
    full = apply_delta_state(state, base, "test")
    for name in ("odd", "wide"):
        change = current[name] - base[name]
        step = change.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert ((full[name] - current[name]).abs() <= step / 2 + 1e-6).all(), name
    assert torch.equal(full["vector"], current["vector"])  # vectors are stored exactly
    stored = state["wide" + code].numel() * state["wide" + code].element_size()
    assert stored == current["wide"].numel() * current["wide"].element_size() * bits // 32
    with pytest.raises(ValueError, match="does not fit"):
        apply_delta_state({**state, "odd" + code: state["odd" + code][:, :1]}, base, "test")
    with pytest.raises(ValueError, match="does not fit"):
        apply_delta_state({k: v for k, v in state.items() if k != "odd@scale"}, base, "test")


def test_delta_bits_are_checked_in_the_config():
    from continual_transformer.errors import ConfigError

    with pytest.raises(ConfigError, match="delta_bits"):
        session("finetune", delta_bits=3)


@pytest.mark.parametrize("strategy", ["finetune", "ttt"])
def test_rounded_learning_stays_close_to_exact_and_is_what_a_checkpoint_holds(strategy, tmp_path):
    exact, rounded = session(strategy, delta_bits=0), session(strategy, delta_bits=8)
    for s in (exact, rounded):
        s.learn(make_document(DOC, "d"))
    probe = ["Where does the Orvalis flow?"]
    reference, logits = exact.strategy.forward_logits(probe), rounded.strategy.forward_logits(probe)
    assert not torch.equal(reference, logits), "the learned change was rounded"
    assert (logits - reference).abs().max() < 0.02 * reference.abs().max()
    exact.save(tmp_path / "exact")
    path = rounded.save(tmp_path / "rounded")
    assert tensor_bytes_on_disk(path) < tensor_bytes_on_disk(tmp_path / "exact") / 3
    written = {p.name: p.stat().st_mtime_ns for p in path.iterdir() if p.name.startswith("tensors-")}
    rounded.save(path)  # the codes are kept, not recomputed: nothing to write
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir() if p.name.startswith("tensors-")} == written
    fresh = session(strategy, delta_bits=8)
    fresh.load(path)
    assert torch.equal(fresh.strategy.forward_logits(probe), logits)
    fresh.save(tmp_path / "again")  # a reloaded state saves the same codes
    assert {p.name for p in (tmp_path / "again").iterdir() if p.name.startswith("tensors-")} == set(written)


@pytest.mark.parametrize("strategy", ["finetune", "ttt"])
def test_rounding_one_tensor_at_a_time_gives_the_whole_state_rounding(strategy):
    """After learning, each trained tensor is rounded on its own device (finetune keeps its base on the CPU):
    the weights and the codes are exactly those of rounding the whole state at once."""
    s = session(strategy, delta_bits=8)
    s.learn(make_document(DOC, "d"))
    params = s.strategy.trainable_parameters()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params.values():
            p.add_(1e-3 * torch.randn(p.shape, generator=generator).to(p.dtype))
    base = s.strategy.delta_base()
    current = {k: p.detach().clone() for k, p in params.items()}
    expected_state = delta_state(current, base, bits=8)
    expected = apply_delta_state(expected_state, base, strategy)
    s.strategy._round_to_stored()
    assert set(s.strategy._rounded) == set(expected_state)
    assert all(torch.equal(s.strategy._rounded[k], v) for k, v in expected_state.items())
    assert all(torch.equal(params[k].detach(), expected[k]) for k in params)
