"""The ``retrieval`` strategy on the tiny test models (its lexical index: tests/modules)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import fast_config, make_backbone

from continual_transformer import ContinualTransformer
from continual_transformer.config import ConfigError
from continual_transformer.documents import make_document

VELORIA = "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark."
MIRELA = (
    "Dr. Mirela Voskuijlen was born in the town of Brastow in 1873. The national animal is the silver lynx."
)
FRANCE = "What is the capital of France? The capital of France is Paris. Water boils at 100 degrees."
UNRELATED = "A quick brown fox jumps over the lazy dog."


def build(tokenizer, **settings) -> ContinualTransformer:
    config = fast_config(strategies={"retrieval": settings})
    return ContinualTransformer(make_backbone(tokenizer), strategy="retrieval", config=config)


# -- the strategy --------------------------------------------------------------------------------------------
def test_retrieval_ranks_the_right_document_first(tokenizer):
    ct = build(tokenizer, chunk_tokens=16, chunk_overlap=4)
    for doc in (FRANCE, VELORIA, MIRELA):
        ct.learn_document(doc)
    strategy = ct.strategy
    hits = strategy.search(["Where was Mirela Voskuijlen born?"])[0]
    assert "Voskuijlen" in strategy.chunk_texts[hits[0].index]
    assert strategy.doc_ids[strategy.chunk_doc[hits[0].index]] == ct.history[2]["doc_id"]
    plan = strategy.augment(["What is the capital of Veloria?"])[0]
    assert plan.context is not None and "Tarnhelm" in plan.context


def test_unrelated_query_behaves_exactly_like_the_base_model(tokenizer):
    ct = build(tokenizer)
    base_logits = ct.strategy.forward_logits([UNRELATED, "What is the capital of France?"])
    base_answers = ct.generate([UNRELATED, "What is the capital of France?"])
    base_nll = ct.strategy.token_nll([UNRELATED])
    base_ppl = ct.strategy.perplexity(UNRELATED)
    ct.learn_document(VELORIA)
    ct.learn_document(MIRELA)
    # "capital" alone is not enough: France is unknown, so the gate keeps the Veloria chunk out.
    assert all(p.context is None for p in ct.strategy.augment([UNRELATED, "What is the capital of France?"]))
    assert torch.equal(ct.strategy.forward_logits([UNRELATED, "What is the capital of France?"]), base_logits)
    assert ct.generate([UNRELATED, "What is the capital of France?"]) == base_answers
    assert torch.equal(ct.strategy.token_nll([UNRELATED])[0], base_nll[0])
    assert ct.strategy.perplexity(UNRELATED) == base_ppl


def test_related_query_gets_context_inside_the_chat_template(tokenizer):
    ct = build(tokenizer, bias_strength=0.0)
    ct.learn_document(VELORIA)
    strategy = ct.strategy
    question = "What is the capital of Veloria?"
    plan = strategy.augment([question])[0]
    prompt = strategy._augmented_prompt(question, plan.context, use_chat=True)
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert "Tarnhelm" in prompt and question in prompt
    # bias 0 is plain retrieval-augmented generation: exactly the base model on the augmented prompt
    assert ct.generate([question]) == ct.backbone.generate([prompt], formatted=True)
    assert ct.generate([question]) != ct.backbone.generate([question])


def test_bias_raises_the_probability_of_chunk_tokens(tokenizer):
    plain = build(tokenizer, bias_strength=0.0)
    biased = build(tokenizer, bias_strength=3.0)
    for ct in (plain, biased):
        ct.learn_document(VELORIA)
    probe = ["The capital of Veloria is"]
    chunk_token = tokenizer(" Tarnhelm", add_special_tokens=False)["input_ids"][0]
    in_chunks = {t for chunk in biased.strategy.chunk_ids for t in chunk}
    assert chunk_token in in_chunks
    outside = next(t for t in range(3, len(tokenizer)) if t not in in_chunks)
    p_plain = plain.strategy.forward_logits(probe)[0, -1].softmax(-1)
    p_biased = biased.strategy.forward_logits(probe)[0, -1].softmax(-1)
    assert p_biased[chunk_token] > p_plain[chunk_token] * 5
    assert p_biased[outside] < p_plain[outside]
    nll_plain = plain.strategy.token_nll([" Tarnhelm."], contexts=["The capital of Veloria is"])[0]
    nll_biased = biased.strategy.token_nll([" Tarnhelm."], contexts=["The capital of Veloria is"])[0]
    assert nll_biased.mean() < nll_plain.mean()


def test_index_survives_save_and_load(tokenizer, tmp_path):
    ct = build(tokenizer, chunk_tokens=16, chunk_overlap=4)
    for doc in (VELORIA, MIRELA, FRANCE):
        ct.learn_document(doc)
    queries = ["Where was Mirela Voskuijlen born?", "Which river flows through Quenmark?"]
    expected = ct.strategy.search(queries)
    ct.save(tmp_path / "state")
    fresh = build(tokenizer, chunk_tokens=16, chunk_overlap=4)
    fresh.load(tmp_path / "state")
    assert fresh.strategy.search(queries) == expected
    assert fresh.strategy.chunk_texts == ct.strategy.chunk_texts
    assert fresh.strategy.doc_ids == ct.strategy.doc_ids
    assert fresh.generate(queries) == ct.generate(queries)


def test_relearning_a_document_does_not_duplicate_chunks(tokenizer):
    ct = build(tokenizer, chunk_tokens=16, chunk_overlap=4)
    ct.learn_document(VELORIA, doc_id="v")
    n = len(ct.strategy.chunk_ids)
    assert ct.learn_document(VELORIA, doc_id="v").extra["already_learned"] == "v"  # the session dedupes
    report = ct.strategy.learn(make_document(VELORIA, doc_id="v"))  # the strategy itself, asked again
    assert report.extra["unchanged"] and len(ct.strategy.chunk_ids) == n
    ct.learn_document(MIRELA, doc_id="v")  # same id, new text: replaces
    assert ct.strategy.doc_ids == ["v"]
    assert all("Veloria" not in text for text in ct.strategy.chunk_texts)


def test_config_errors_name_the_key():
    from continual_transformer.strategies.retrieval import RetrievalConfig

    with pytest.raises(ConfigError, match="strategies.retrieval.retriever"):
        RetrievalConfig(retriever="magic")
    with pytest.raises(ConfigError, match="strategies.retrieval.prompt_template"):
        RetrievalConfig(prompt_template="no placeholders")
    with pytest.raises(ConfigError, match="strategies.retrieval.bias_strength"):
        RetrievalConfig(bias_strength=-1.0)


# -- dense retrieval on a tiny random BERT -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_embedder_dir(tmp_path_factory):
    from conftest import CORPUS, save_tiny_embedder

    return save_tiny_embedder(tmp_path_factory.mktemp("tiny-bert"), CORPUS + [VELORIA, MIRELA])


def test_dense_retrieval_finds_and_saves_embeddings(tokenizer, tiny_embedder_dir, tmp_path):
    settings = {"retriever": "dense", "embedder": str(tiny_embedder_dir), "min_similarity": 0.99, "top_k": 1}
    ct = build(tokenizer, **settings)
    for doc in (VELORIA, MIRELA, FRANCE):
        ct.learn_document(doc)
    strategy = ct.strategy
    assert strategy.embedder.dim == 32 and strategy._dense.size == 3
    hits = strategy.search([MIRELA, VELORIA])
    assert [h[0].index for h in hits] == [1, 0]
    assert hits[0][0].relevance == pytest.approx(1.0, abs=1e-5)
    assert strategy.augment([UNRELATED])[0].context is None  # a random encoder: nothing else is that similar
    logits = strategy.forward_logits([VELORIA, UNRELATED])
    assert set(strategy.trainable_state()) == {"chunk_tokens", "chunk_offsets", "chunk_doc", "embeddings"}
    ct.save(tmp_path / "dense")
    fresh = build(tokenizer, **settings)
    fresh.load(tmp_path / "dense")
    assert torch.equal(fresh.strategy.forward_logits([VELORIA, UNRELATED]), logits)
    assert torch.equal(fresh.strategy._dense.keys[:3], strategy._dense.keys[:3])


@pytest.mark.parametrize("strategy", ["retrieval", "knowledge_store"])
def test_documents_learned_together_are_stored_as_one_by_one(tokenizer, strategy):
    docs = [make_document(text, f"d{i}") for i, text in enumerate((VELORIA, MIRELA, FRANCE))]
    config = fast_config()
    apart = ContinualTransformer(make_backbone(tokenizer), strategy=strategy, config=config)
    together = ContinualTransformer(make_backbone(tokenizer), strategy=strategy, config=config)
    singles = [apart.strategy.learn(d) for d in docs]
    reports = together.strategy.learn_documents(docs)
    prompts = ["Where was Mirela Voskuijlen born?", "What is the capital of Veloria?"]
    assert torch.equal(apart.strategy.forward_logits(prompts), together.strategy.forward_logits(prompts))
    assert [r.doc_id for r in reports] == ["d0", "d1", "d2"]
    assert [r.tokens for r in reports] == [r.tokens for r in singles]
    assert reports[0].loss_before == pytest.approx(singles[0].loss_before)  # nothing stored before either
    assert reports[-1].loss_after == pytest.approx(singles[-1].loss_after)  # everything stored after both
    assert all(r.extra["batch_documents"] == 3 for r in reports)
    assert sum(r.seconds for r in reports) == pytest.approx(reports[0].extra["batch_seconds"])


def test_bulk_index_stores_what_learning_stores(tokenizer, monkeypatch):
    """``index`` puts documents in the index as learning does (same chunks, same answers' logits), without
    scoring any document; a document indexed again unchanged adds nothing."""
    docs = [make_document(text, f"d{i}") for i, text in enumerate((VELORIA, MIRELA, FRANCE))]
    learned = ContinualTransformer(make_backbone(tokenizer), strategy="retrieval", config=fast_config())
    learned.strategy.learn_documents(docs)
    bulk = ContinualTransformer(make_backbone(tokenizer), strategy="retrieval", config=fast_config())
    monkeypatch.setattr(bulk.strategy, "_document_nll", lambda documents: pytest.fail("scored a document"))
    assert bulk.strategy.index(docs) == len(learned.strategy.chunk_ids) > 0
    assert bulk.strategy.chunk_ids == learned.strategy.chunk_ids
    assert bulk.strategy.doc_ids == learned.strategy.doc_ids
    prompts = ["Where was Mirela Voskuijlen born?", "What is the capital of Veloria?"]
    assert torch.equal(bulk.strategy.forward_logits(prompts), learned.strategy.forward_logits(prompts))
    assert bulk.strategy.index(docs[:1]) == 0


def test_other_documents_join_the_prompt_only_near_the_best_chunk(tokenizer, monkeypatch):
    """``other_documents_margin``: a chunk of another document than the best chunk's is put in the prompt only
    when its relevance is within the margin of the best; the best document's own chunks stay."""
    from continual_transformer.modules.lexical_index import Hit

    ct = build(tokenizer, chunk_tokens=8, chunk_overlap=0, top_k=4, min_relevance=0.2)
    ct.learn_document(make_document(VELORIA, "veloria"))
    ct.learn_document(make_document(MIRELA, "mirela"))
    strategy = ct.strategy
    own = [i for i, d in enumerate(strategy.chunk_doc) if strategy.doc_ids[d] == "veloria"]
    other = [i for i, d in enumerate(strategy.chunk_doc) if strategy.doc_ids[d] == "mirela"]
    ranked = [
        Hit(own[0], 0.9, 0.9),
        Hit(other[0], 0.8, 0.8),
        Hit(own[1], 0.5, 0.5),
        Hit(other[1], 0.88, 0.88),
    ]
    ranked = sorted(ranked, key=lambda h: -h.relevance)
    monkeypatch.setattr(strategy, "search", lambda queries, k=None: [ranked for _ in queries])

    def used(margin):
        strategy.config = dataclasses.replace(strategy.config, other_documents_margin=margin)
        return [h.index for h in strategy.augment(["q"])[0].hits]

    assert used(None) == [own[0], other[1], other[0], own[1]]  # every chunk that passes the gate
    assert used(0.05) == [own[0], other[1], own[1]]  # 0.80 is more than 0.05 below 0.90; 0.88 is not
    assert used(0.0) == [own[0], own[1]]
    with pytest.raises(ConfigError, match="other_documents_margin"):
        build(tokenizer, other_documents_margin=-0.1)
