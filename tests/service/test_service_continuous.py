"""Continuous batching: decoding rows that prompts join and leave between steps (DecodeSlots) and the
service's generation thread on them. Every answer must equal the prompt's solo answer."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
import torch
from conftest import build_tokenizer, make_backbone
from service_helpers import tiny_session

from continual_transformer.decode_slots import DecodeSlots, supports_slots
from continual_transformer.documents import Document
from continual_transformer.service.batcher import Batcher
from continual_transformer.service.errors import ServiceError
from continual_transformer.service.rwlock import ReadWriteLock
from continual_transformer.service.settings import ServiceConfig
from continual_transformer.strategies import registry

PROMPTS = [
    "hello there",
    "A quick brown fox jumps over the lazy dog. questions answers",
    "memory",
    "documents learning memory questions answers 0123456789 fox",
    "fox",
    "the lazy dog",
    "0123456789",
]
BUDGETS = [3, 12, 9, 5, 12, 2, 11]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_joining_at_different_steps_answer_as_alone(arch):
    backbone = make_backbone(build_tokenizer(), arch=arch, max_new_tokens=12)
    solo = [backbone.generate([p], chat=False, max_new_tokens=n)[0] for p, n in zip(PROMPTS, BUDGETS)]
    # 3 rows of 36 positions: prompts wait for a free row, join mid-answer, and the rows get compacted
    slots = DecodeSlots(backbone, rows=3, length=36)
    answers, queue, joined_at = {}, list(range(len(PROMPTS))), {}
    while queue or slots.live:
        if queue and slots.free:  # one newcomer per step: they join at different steps
            k = queue.pop(0)
            joined_at[k] = slots.steps
            done = slots.add(k, slots.model_ids(PROMPTS[k], chat=False), BUDGETS[k])
            if done is not None:
                answers[done.key] = done.text
        for done in slots.step():
            answers[done.key] = done.text
            assert len(done.token_ids) <= BUDGETS[done.key]
    assert [answers[k] for k in range(len(PROMPTS))] == solo
    assert len(set(joined_at.values())) == len(PROMPTS)
    assert slots.compactions >= 1 and slots.resizes >= 2  # rows compacted; narrower and wider steps
    assert slots.live == 0 and slots.free == 3


def test_random_arrivals_with_frequent_compaction_and_resizing_answer_as_alone():
    backbone = make_backbone(build_tokenizer(), max_new_tokens=16)
    rng = random.Random(0)
    words = " ".join(PROMPTS).split()
    prompts = [" ".join(rng.choices(words, k=rng.randint(1, 9))) for _ in range(16)]
    budgets = [rng.randint(1, 16) for _ in prompts]
    slots = DecodeSlots(backbone, rows=4, length=40)
    answers, waiting = {}, list(range(len(prompts)))
    while waiting or slots.live:
        for _ in range(rng.randint(0, 3)):  # 0 to 3 arrivals before each step
            if waiting and slots.free:
                k = waiting.pop(0)
                done = slots.add(k, slots.model_ids(prompts[k], chat=False), budgets[k])
                if done is not None:
                    answers[k] = done.text
        answers.update((d.key, d.text) for d in slots.step())
    solo = [backbone.generate([p], chat=False, max_new_tokens=n)[0] for p, n in zip(prompts, budgets)]
    assert [answers[k] for k in range(len(prompts))] == solo
    assert slots.compactions >= 2 and slots.resizes >= 3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompts_prefilled_together_answer_as_alone(arch):
    backbone = make_backbone(build_tokenizer(), arch=arch, max_new_tokens=10)
    slots = DecodeSlots(backbone, rows=8, length=96)
    slots.remember_prefix(slots.chat_prefix())
    chats = [k % 2 == 0 for k in range(len(PROMPTS))]  # with the chat prefix, and without
    joining = [(k, slots.model_ids(p, chat=c), 10) for k, (p, c) in enumerate(zip(PROMPTS, chats))][:6]
    answers = {d.key: d.text for d in slots.add_many(joining)}
    assert slots.live + len(answers) == 6 and slots.prefix_hits == 3
    while slots.live:
        answers.update((d.key, d.text) for d in slots.step())
    solo = [backbone.generate([p], chat=c, max_new_tokens=10)[0] for p, c in zip(PROMPTS, chats)][:6]
    assert [answers[k] for k in range(6)] == solo
    with pytest.raises(RuntimeError):
        slots.add_many([(k, slots.model_ids("fox"), 4) for k in range(9)])
    assert slots.live == 0


def test_a_chat_prompt_and_a_budget_of_one_finish_at_join():
    backbone = make_backbone(build_tokenizer(), max_new_tokens=4)
    slots = DecodeSlots(backbone, rows=2, length=64)
    done = slots.add("k", slots.model_ids("hello there", chat=True), 1)
    assert done is not None and slots.free == 2
    assert done.text == backbone.generate(["hello there"], chat=True, max_new_tokens=1)[0]
    with pytest.raises(ValueError):
        slots.add("long", list(range(60)), 8)


def test_prompts_after_a_remembered_prefix_answer_as_alone():
    backbone = make_backbone(build_tokenizer(), max_new_tokens=8)
    slots = DecodeSlots(backbone, rows=2, length=96)
    prefix = slots.chat_prefix()
    assert prefix and slots.model_ids("fox", chat=True)[: len(prefix)] == prefix
    slots.remember_prefix(prefix)
    answers = {}
    for k, prompt in enumerate(PROMPTS[:4]):
        if not slots.free:
            while slots.live == slots.rows:
                answers.update((d.key, d.text) for d in slots.step())
        done = slots.add(k, slots.model_ids(prompt, chat=True), 8)
        if done is not None:
            answers[k] = done.text
    while slots.live:
        answers.update((d.key, d.text) for d in slots.step())
    solo = [backbone.generate([p], chat=True, max_new_tokens=8)[0] for p in PROMPTS[:4]]
    assert [answers[k] for k in range(4)] == solo
    assert slots.prefix_hits == 4
    # new weights: the prefix's keys and values are computed again
    with torch.no_grad():
        backbone.model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    slots.forget_prefixes()
    done = None
    slots.add("again", slots.model_ids("memory", chat=True), 6)
    while done is None:
        done = next(iter(slots.step()), None)
    assert done.text == backbone.generate(["memory"], chat=True, max_new_tokens=6)[0]


def test_models_reading_column_distances_are_refused():
    backbone = make_backbone(build_tokenizer())
    assert supports_slots(backbone)
    backbone.model.config.sliding_window = 16
    assert not supports_slots(backbone)
    with pytest.raises(ValueError):
        DecodeSlots(backbone, rows=2, length=32)


# -- the service's generation thread -----------------------------------------------------------------------


class _Served:
    """A batcher with continuous batching on a tiny session, its thread running."""

    def __init__(self, monkeypatch, *, strategy: str = "none", step_delay: float = 0.0, **settings):
        self.session = tiny_session(strategy)
        self.made: list[DecodeSlots] = []
        made, step = self.made, DecodeSlots.step

        def decode_slots(backbone, rows, length):
            made.append(DecodeSlots(backbone, rows=rows, length=length))
            return made[-1]

        def slow_step(slots):
            time.sleep(step_delay)
            return step(slots)

        monkeypatch.setattr(type(self.session.backbone), "decode_slots", decode_slots)
        monkeypatch.setattr(DecodeSlots, "step", slow_step)
        config = ServiceConfig(continuous=True, max_batch=settings.pop("max_batch", 3), **settings)
        self.counters: Counter = Counter()
        self.batcher = Batcher(config, lambda: self.session, ReadWriteLock(), self.counters)
        self.thread = threading.Thread(target=self.batcher.run, daemon=True)
        self.thread.start()

    def solo(self, prompt: str, n: int, chat: bool | None = False) -> str:
        return self.session.generate([prompt], chat=chat, max_new_tokens=n)[0]

    def close(self) -> None:
        self.batcher.stop(5)
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def served(monkeypatch):
    made = []

    def build(**kwargs):
        made.append(_Served(monkeypatch, **kwargs))
        return made[-1]

    yield build
    for s in made:
        s.close()


def test_service_answers_equal_solo_answers_and_rows_are_reused(served):
    s = served(max_batch=2)
    futures = []
    for k, (prompt, n) in enumerate(zip(PROMPTS, BUDGETS)):
        futures.append(s.batcher.submit(prompt, chat=bool(k % 2), max_new_tokens=n))
        time.sleep(0.002 * k)  # arrivals spread over the decoding steps
    answers = [f.result(timeout=60) for f in futures]
    expected = [s.solo(p, n, chat=bool(k % 2)) for k, (p, n) in enumerate(zip(PROMPTS, BUDGETS))]
    assert [a.text for a in answers] == expected
    assert len(s.made) == 1 and s.made[0].rows == 2  # 7 requests through the same 2 rows
    assert s.counters["answered"] == len(PROMPTS)
    assert s.made[0].prefix_hits >= 3  # the chat prompts prefilled after the template's shared part
    assert all(a.completion_tokens <= n for a, n in zip(answers, BUDGETS))


def wait_until(condition, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fail (not hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(0.002)


def test_a_short_answer_finishes_before_a_long_one_that_started_earlier(served):
    s = served(step_delay=0.01)
    long = s.batcher.submit("memory", chat=False, max_new_tokens=60)
    wait_until(lambda: s.made and s.made[0].steps >= 3)  # the long answer is decoding
    short = s.batcher.submit("fox", chat=False, max_new_tokens=3)
    assert short.result(timeout=60).text == s.solo("fox", 3)
    assert not long.done()
    assert long.result(timeout=60).text == s.solo("memory", 60)


def test_a_failing_row_does_not_poison_the_others(served, monkeypatch):
    s = served(step_delay=0.005)
    add_many = DecodeSlots.add_many
    boom = "boom boom boom boom"

    def failing_add_many(slots, prompts):
        if any(ids == slots.model_ids(boom, chat=False) for _, ids, *_ in prompts):
            raise RuntimeError("bad prompt")
        return add_many(slots, prompts)

    monkeypatch.setattr(DecodeSlots, "add_many", failing_add_many)
    good = s.batcher.submit("memory", chat=False, max_new_tokens=20)
    wait_until(lambda: s.made and s.made[0].live)
    # arriving together: the prompts prefilled with the failing one are prefilled again alone
    bad = s.batcher.submit(boom, chat=False, max_new_tokens=5)
    other = s.batcher.submit("fox", chat=False, max_new_tokens=6)
    with pytest.raises(ServiceError) as caught:
        bad.result(timeout=60)
    assert caught.value.status == 500
    assert good.result(timeout=60).text == s.solo("memory", 20)
    assert other.result(timeout=60).text == s.solo("fox", 6)

    # a failed shared step fails its rows only; the next request is answered on fresh rows
    monkeypatch.setattr(DecodeSlots, "add_many", add_many)
    step = DecodeSlots.step
    monkeypatch.setattr(DecodeSlots, "step", lambda slots: (_ for _ in ()).throw(RuntimeError("step")))
    broken = s.batcher.submit("fox", chat=False, max_new_tokens=5)
    with pytest.raises(ServiceError):
        broken.result(timeout=60)
    monkeypatch.setattr(DecodeSlots, "step", step)
    assert s.batcher.submit("fox", chat=False, max_new_tokens=5).result(timeout=60).text == s.solo("fox", 5)


def test_a_row_past_the_generation_timeout_gets_a_504_and_frees_its_row(served):
    s = served(step_delay=0.05, generation_timeout=0.5)
    slow = s.batcher.submit("memory", chat=False, max_new_tokens=200)
    with pytest.raises(ServiceError) as caught:
        slow.result(timeout=60)
    assert caught.value.status == 504 and caught.value.code == "generation_timeout"
    assert s.made[0].live == 0
    assert s.batcher.submit("fox", chat=False, max_new_tokens=3).result(timeout=60).text == s.solo("fox", 3)


def test_requests_rows_cannot_serve_take_the_batch_path(served):
    from continual_transformer.service.generation import GenerationOptions

    s = served(strategy="in_context", max_batch=2)
    s.session.learn(Document(id="v", text="The capital of Veloria is Tarnhelm."))
    plain = s.batcher.submit("memory", chat=False, max_new_tokens=6)
    assert plain.result(timeout=60).text == s.solo("memory", 6)
    assert not s.made  # in_context puts documents in the prompt: no rows are made for it
    s.session.strategy.reset()
    seeded = s.batcher.submit(
        "fox", chat=False, max_new_tokens=4, options=GenerationOptions(temperature=0.0, seed=3)
    )
    assert seeded.result(timeout=60).text == s.solo("fox", 4)


def test_the_http_service_answers_with_continuous_batching_as_the_session_does(tmp_path, monkeypatch):
    from service_helpers import client, make_engine

    made = []
    decode_slots = type(tiny_session().backbone).decode_slots
    monkeypatch.setattr(
        type(tiny_session().backbone),
        "decode_slots",
        lambda backbone, rows, length: made.append(decode_slots(backbone, rows, length)) or made[-1],
    )
    question = "What is the capital of Veloria?"
    doc = "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark."
    engine = make_engine(tmp_path, session=tiny_session("finetune"), continuous=True)
    with client(engine) as api:
        session = api.app.state.engine.session
        before = api.post("/ask", json={"question": question}).json()["answer"]
        assert before == session.generate([question], chat=True)[0]
        response = api.post("/documents", json={"text": doc, "id": "veloria", "wait": True})
        assert response.status_code == 200, response.text
        after = api.post("/ask", json={"question": question}).json()["answer"]
        # the weights changed between two runs: the remembered chat prefix was computed again
        assert after == session.generate([question], chat=True)[0] != before
        texts = api.post("/generate", json={"prompts": [question, "fox"], "chat": True}).json()["texts"]
        assert texts == [after, session.generate(["fox"], chat=True)[0]]
    assert len(made) == 1 and made[0].prefix_hits >= 3


NOT_SHARED = {"in_context", "knowledge_store", "memory_bank", "ace", "doc2lora"}
"""Strategies whose answers are made per call (kNN mixing, fused memories, adapters chosen per prompt, a
playbook): the batch path answers for them. Retrieval shares rows: its prompt with the retrieved context and
its logit bias are the row's (``Strategy.decoding_inputs``)."""


@pytest.mark.parametrize("name", sorted(registry.names()))
def test_every_strategy_that_shares_rows_answers_as_alone_after_learning(name):
    from continual_transformer.service.batcher import _answers_shared

    session = tiny_session(name)
    session.learn(Document(id="v", text="The capital of Veloria is Tarnhelm. The Orvalis river is long."))
    assert _answers_shared(session) == (name not in NOT_SHARED)
    if name in NOT_SHARED:
        return
    prompts = ["What is the capital of Veloria?", "fox", "Where does the Orvalis river flow?"]
    slots = session.backbone.decode_slots(2, 96)
    slots.remember_prefix(slots.chat_prefix())
    answers = {}
    for k, prompt in enumerate(prompts):
        while not slots.free:
            answers.update((d.key, d.text) for d in slots.step())
        (decoded,) = session.strategy.decoding_inputs([prompt], chat=True)
        done = slots.add(k, session.backbone.token_ids(decoded.text), 8, decoded.bias)
        if done is not None:
            answers[k] = done.text
    while slots.live:
        answers.update((d.key, d.text) for d in slots.step())
    assert [answers[k] for k in range(3)] == [session.generate([p], chat=True)[0] for p in prompts]


def test_retrieval_rows_carry_their_context_and_logit_bias():
    """A question the retrieved context answers decodes its augmented prompt with the bias towards the
    context's tokens (an unrelated one decodes the plain prompt), sharing rows, exactly as ``generate``."""
    session = tiny_session("retrieval")
    session.learn(Document(id="v", text="The capital of Veloria is Tarnhelm. The Orvalis river is long."))
    prompts = ["What is the capital of Veloria?", "fox"]
    related, unrelated = session.strategy.decoding_inputs(prompts, chat=True)
    assert related.bias is not None and "Tarnhelm" in related.text and related.bias.abs().sum() > 0
    assert unrelated.bias is None and unrelated.text == session.backbone.model_text("fox", chat=True)
    slots = session.backbone.decode_slots(2, 160)
    answers = {}
    for k, decoded in enumerate((related, unrelated)):
        done = slots.add(k, session.backbone.token_ids(decoded.text), 8, decoded.bias)
        if done is not None:
            answers[k] = done.text
    while slots.live:
        answers.update((d.key, d.text) for d in slots.step())
    assert [answers[0], answers[1]] == [session.generate([p], chat=True)[0] for p in prompts]
    # the bias is applied: on the tiny model it outweighs the logits, so the first token is a context token
    unbiased = session.backbone.decode_slots(1, 160).add(0, session.backbone.token_ids(related.text), 1)
    biased = slots.add(9, session.backbone.token_ids(related.text), 1, related.bias)
    assert unbiased is not None and biased is not None
    assert related.bias[biased.token_ids[0]] > 0 and biased.token_ids != unbiased.token_ids
