"""Doc-to-LoRA: the hypernetwork, its gate, chunk composition, refusal without trained weights, and
meta-training under ``accelerate launch`` with two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tokenizer, fast_config, make_backbone, tiny_llama

from continual_transformer import ContinualTransformer
from continual_transformer.hypernetwork.model import (
    GeneratedLoRA,
    HyperNetConfig,
    HyperNetSpec,
    HyperNetwork,
    HypernetworkNotTrained,
    save_hypernetwork,
)

DOC = "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark."
OTHER = (
    "Dr. Mirela Voskuijlen was born in the town of Brastow in 1873. The national animal is the silver lynx."
)
UNRELATED = (
    "A quick brown fox jumps over the lazy dog. 0123456789 questions answers documents learning memory."
)
SRC = str(Path(__file__).resolve().parent.parent / "src")


def network_file(
    tmp_path: Path, *, zero: bool = False, trained: bool = False, chunk_tokens: int = 32
) -> Path:
    backbone = make_backbone(build_tokenizer())
    config = HyperNetConfig(rank=2, hidden=32, heads=2, blocks=1, chunk_tokens=chunk_tokens)
    torch.manual_seed(0)
    network = HyperNetwork(HyperNetSpec.for_backbone(backbone, config))
    if not zero:
        for head in network.head_b.values():
            torch.nn.init.normal_(head.weight, std=0.2)
    return save_hypernetwork(network, tmp_path / "h.safetensors", training={"test": 1} if trained else None)


def build(tokenizer, **settings) -> ContinualTransformer:
    strategies = {"doc2lora": {"allow_untrained": True, **settings}}
    return ContinualTransformer(
        make_backbone(tokenizer), strategy="doc2lora", config=fast_config(strategies=strategies)
    )


def test_untrained_network_emits_zero_delta_model_is_bit_identical(tokenizer, tmp_path):
    ct = build(tokenizer, hypernetwork=str(network_file(tmp_path, zero=True)))
    base = ct.strategy.forward_logits([DOC, UNRELATED])
    ct.learn_document(DOC)
    assert torch.equal(ct.strategy.forward_logits([DOC, UNRELATED]), base)


def test_no_trained_weights_refuses_to_learn(tokenizer, tmp_path):
    untrained = network_file(tmp_path)
    ct = ContinualTransformer(
        make_backbone(tokenizer),
        strategy="doc2lora",
        config=fast_config(
            strategies={"doc2lora": {"hypernetwork": str(untrained), "allow_untrained": False}}
        ),
    )
    with pytest.raises(HypernetworkNotTrained, match="marked untrained"):
        ct.learn_document(DOC)
    assert ct.stats().documents == 0
    shipped_none = ContinualTransformer(
        make_backbone(tokenizer),
        strategy="doc2lora",
        config=fast_config(strategies={"doc2lora": {"hypernetwork": ""}}),
    )
    with pytest.raises(HypernetworkNotTrained, match="missing"):
        shipped_none.learn_document(DOC)
    with pytest.raises(HypernetworkNotTrained, match="no file"):
        build(tokenizer, hypernetwork=str(tmp_path / "absent.safetensors"))


def test_gate_gives_no_adapter_to_unrelated_queries(tokenizer, tmp_path):
    # one chunk per document: a query that is the whole document has its embedding exactly
    path = network_file(tmp_path, chunk_tokens=128)
    ct = build(tokenizer, hypernetwork=str(path), gate_threshold=0.999, gate_top_k=1)
    base = ct.strategy.forward_logits([DOC, OTHER, UNRELATED])
    base_answers = ct.backbone.generate([UNRELATED], chat=False)
    ct.learn_document(DOC)
    ct.learn_document(OTHER)
    sims = ct.strategy.similarities([DOC, OTHER, UNRELATED])
    assert sims[0].argmax() == 0 and sims[1].argmax() == 1
    assert torch.allclose(sims[0, 0], torch.tensor(1.0)) and float(sims[2].max()) < 0.999
    gate = ct.strategy.gate([DOC, OTHER, UNRELATED])
    assert gate.tolist() == [[True, False], [False, True], [False, False]]
    learned = ct.strategy.forward_logits([DOC, OTHER, UNRELATED])
    assert not torch.equal(learned[0], base[0]) and not torch.equal(learned[1], base[1])
    assert torch.equal(learned[2], base[2]), "an unrelated query is scored by the base model exactly"
    assert ct.strategy.generate([UNRELATED], chat=False) == base_answers
    # only the gated document applies: the first row sees DOC's adapter alone, not OTHER's as well
    with ct.strategy.applied(torch.tensor([[True, True]])):
        both = ct.backbone.model(**ct.backbone.encode([DOC])).logits.float()
    assert not torch.allclose(both[0], learned[0, : both.shape[1]])


def test_chunks_compose_by_rank_concatenation(tokenizer, tmp_path):
    ct = build(tokenizer, hypernetwork=str(network_file(tmp_path, chunk_tokens=8)), gate_threshold=-1.0)
    factors, embeddings = ct.strategy.adapter(DOC + " " + OTHER)
    chunks = embeddings.shape[0]
    assert chunks > 2 and factors[0][0].shape[0] == 2 * chunks  # rank 2 per chunk
    wrapper = ct.strategy.wrappers[0]
    x = torch.randn(3, 5, wrapper.base.in_features)
    a, b = factors[0]
    wrapper.factors = (a[None], b[None], None)
    together = wrapper(x)
    wrapper.factors = None
    base = wrapper(x)
    parts = torch.zeros_like(base)
    for c in range(chunks):
        wrapper.factors = (a[None, 2 * c : 2 * c + 2], b[None, :, 2 * c : 2 * c + 2], None)
        parts += wrapper(x) - base
    wrapper.factors = None
    assert torch.allclose(together, base + parts, atol=1e-5)
    assert isinstance(wrapper, GeneratedLoRA)


def test_text_mode_applies_to_every_query(tokenizer, tmp_path):
    ct = build(tokenizer, hypernetwork=str(network_file(tmp_path)), mode="text", gate_threshold=0.999)
    base = ct.strategy.forward_logits([UNRELATED])
    ct.learn_document("Answer every question in one short sentence.")
    assert not torch.equal(ct.strategy.forward_logits([UNRELATED]), base)
    with ct.strategy.disabled():
        assert torch.equal(ct.strategy.forward_logits([UNRELATED]), base)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """Two CPU processes (gloo) meta-train a tiny hypernetwork on a tiny model for a few steps on one fixed
    batch, through ``accelerate launch``."""
    root = tmp_path_factory.mktemp("d2l")
    tokenizer = build_tokenizer()
    tiny_llama(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    settings = [
        "sources=[facts,records]", "documents=12", "eval_percent=25", "eval_every=3", "max_chars=200",
        "architecture.hidden=32", "architecture.heads=2", "architecture.blocks=1",
        "architecture.chunk_tokens=64",
        "learning_rate=3e-3", "warmup_steps=0", "fixed_batch=true", "docs_per_step=2", "queries_per_doc=4",
        "distill.max_prefix_queries=4", "distill.max_entity_queries=2", "distill.teacher_max_new_tokens=8",
    ]  # fmt: skip
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "29517", "-m", "continual_transformer.hypernetwork.cli",
        "--model", str(root / "model"), "--out", str(root / "out"),
        "--steps", "6", "--device", "cpu", *[part for item in settings for part in ("--set", item)],
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": SRC,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_two_processes_end_with_identical_weights_and_the_loss_falls(launched):
    report = json.loads((launched / "out" / "report.json").read_text())
    assert report["world_size"] == 2
    assert len(set(report["rank_checksums"])) == 1
    losses = report["train_losses"]
    assert all(map(lambda v: v == v and abs(v) < 1e6, losses)) and losses[-1] < 0.9 * losses[0]
    assert [p["step"] for p in report["curve"]] == [0, 3, 6]
    assert json.loads((launched / "out" / "curve.json").read_text()) == report["curve"]
    assert (launched / "out" / "training_config.json").is_file()


def test_trained_weights_load_into_the_strategy(launched, tmp_path):
    from continual_transformer.backbone import Backbone
    from continual_transformer.config import ModelConfig

    backbone = Backbone.load(ModelConfig(name=str(launched / "model"), device="cpu"))
    path = launched / "out" / "hypernetwork.safetensors"
    config = fast_config(strategies={"doc2lora": {"hypernetwork": str(path), "gate_threshold": -1.0}})
    ct = ContinualTransformer(backbone, strategy="doc2lora", config=config)
    assert ct.strategy.trained and ct.strategy.training_record["world_size"] == 2
    base = ct.strategy.forward_logits([DOC])
    report = ct.learn_document(DOC)
    assert report.extra["rank"] == 4
    assert not torch.equal(ct.strategy.forward_logits([DOC]), base)
    ct.save(tmp_path / "state")
    fresh = ContinualTransformer(Backbone.load(ModelConfig(name=str(launched / "model"), device="cpu")),
                                 strategy="doc2lora", config=config)  # fmt: skip
    fresh.load(tmp_path / "state")
    assert torch.equal(fresh.strategy.forward_logits([DOC]), ct.strategy.forward_logits([DOC]))


def test_resume_continues_the_steps_curve_and_optimizer(launched, tmp_path):
    """A second run with ``resume`` starts from the first's weights and optimizer moments and continues its
    step count and curve; the record lists both segments."""
    from safetensors.torch import load_file

    from continual_transformer.errors import ConfigError
    from continual_transformer.hypernetwork.model import load_hypernetwork
    from continual_transformer.hypernetwork.training import (
        OPTIMIZER_FILE,
        TeacherConfig,
        TrainHypernetworkConfig,
        load_optimizer,
        train_hypernetwork,
    )

    first = launched / "out"
    moments = load_file(str(first / OPTIMIZER_FILE))
    assert any(k.endswith(".exp_avg_sq") and v.abs().sum() > 0 for k, v in moments.items())
    before = load_hypernetwork(first / "hypernetwork.safetensors").training
    config = TrainHypernetworkConfig(
        model=str(launched / "model"), device="cpu", sources=("facts", "records"), documents=12,
        eval_percent=25, eval_every=3, max_chars=200, docs_per_step=2, queries_per_doc=4, steps=3,
        learning_rate=3e-3, warmup_steps=0, cache_dir=str(first / "teacher-cache"),
        out=str(tmp_path / "more"), resume=str(first / "hypernetwork.safetensors"),
        distill=TeacherConfig(max_prefix_queries=4, max_entity_queries=2, teacher_max_new_tokens=8),
    )  # fmt: skip
    report = train_hypernetwork(config)
    assert report.steps == before["steps"] + 3 == 9
    assert [p["step"] for p in report.curve] == [0, 3, 6, 9]
    assert report.curve[:3] == before["curve"]
    after = load_hypernetwork(tmp_path / "more" / "hypernetwork.safetensors")
    assert after.trained and [s["steps"] for s in after.training["segments"]] == [6, 3]
    assert after.network.spec == load_hypernetwork(first / "hypernetwork.safetensors").network.spec
    with pytest.raises(ConfigError, match="not an optimizer state"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / OPTIMIZER_FILE).write_bytes((first / "hypernetwork.safetensors").read_bytes())
        load_optimizer(torch.optim.AdamW(after.network.parameters()), tmp_path / "bad" / OPTIMIZER_FILE)


def test_shipped_hypernetwork_is_found_by_the_base_weights(tokenizer, tmp_path):
    """A model loaded under another name (a local directory, a hub id) finds the shipped hypernetwork trained
    on its weights by the fingerprint the file records; another model's file, or an unreadable one, is not
    taken, and the name's own file comes first."""
    from safetensors.torch import save_file

    from continual_transformer.strategies.doc2lora import shipped_hypernetwork

    backbone = make_backbone(tokenizer)
    backbone.name = "/models/a-local-copy"
    tensor = {"w": torch.zeros(1)}
    save_file(
        tensor, str(tmp_path / "other.safetensors"), metadata={"spec": json.dumps({"base_fingerprint": "x"})}
    )
    (tmp_path / "broken.safetensors").write_bytes(b"\x00not safetensors")
    save_file(tensor, str(tmp_path / "list.safetensors"), metadata={"spec": "[]"})
    missing = shipped_hypernetwork(backbone, tmp_path)
    assert not missing.is_file() and missing.parent == tmp_path, "a path's name stays inside the directory"
    spec = json.dumps({"base_fingerprint": backbone.fingerprint})
    save_file(tensor, str(tmp_path / "tiny.safetensors"), metadata={"spec": spec})
    assert shipped_hypernetwork(backbone, tmp_path) == tmp_path / "tiny.safetensors"
    backbone.name = "other"
    assert shipped_hypernetwork(backbone, tmp_path) == tmp_path / "other.safetensors", "the name first"
