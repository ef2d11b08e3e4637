"""Durability: the journal, snapshots, replay after a crash (exactly once), the bounded queue."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient
from service_helpers import client, make_engine, tiny_session

from continual_transformer.documents import Document, make_document
from continual_transformer.service.app import create_app
from continual_transformer.service.errors import ServiceError
from continual_transformer.service.journal import LEARN, Entry, Journal, JournalError
from continual_transformer.service.rwlock import ReadWriteLock
from continual_transformer.service.store import StateDirBusy


def entry(seq: int, text: str = "some text") -> Entry:
    return Entry(seq=seq, op=LEARN, document=Document(id=f"d{seq}", text=text, source=None))


def learned_ids(engine) -> list[str]:
    return [h["doc_id"] for h in engine.session.history]


def test_journal_appends_reads_and_compacts(tmp_path):
    journal = Journal(tmp_path / "j.jsonl")
    journal.append([entry(1, "line\nbreak \u2028 unicode \u00e9"), entry(2)])
    journal.append([entry(3)])
    assert [e.seq for e in journal.entries()] == [1, 2, 3]
    assert [e.document.text for e in journal.entries(after=0)][0] == "line\nbreak \u2028 unicode \u00e9"
    assert len((tmp_path / "j.jsonl").read_bytes().splitlines()) == 3, "one line per entry, whatever the text"
    with pytest.raises(ValueError, match="not after"):
        journal.append([entry(3)])
    assert journal.compact(2) == 1
    assert [e.seq for e in journal.entries()] == [3]
    journal.append([entry(4)])
    journal.close()
    assert [e.seq for e in Journal(tmp_path / "j.jsonl").entries(after=3)] == [4]


def test_a_torn_last_line_is_dropped_and_a_corrupt_middle_refused(tmp_path):
    path = tmp_path / "j.jsonl"
    journal = Journal(path)
    journal.append([entry(1), entry(2)])
    journal.close()
    whole = path.read_bytes()
    path.write_bytes(whole + entry(3).to_line()[:20])  # killed while writing entry 3
    reopened = Journal(path)
    assert reopened.last_seq == 2 and path.read_bytes() == whole
    reopened.append([entry(3)])
    reopened.close()
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0], b'{"seq": 2, "op"', *lines[2:]]))
    with pytest.raises(JournalError, match="corrupt at line 2"):
        Journal(path)


def test_acknowledged_documents_survive_a_crash_before_learning_exactly_once(tmp_path):
    crashed = make_engine(tmp_path, start_writer=False)  # acknowledges and journals, never learns
    with client(crashed) as api:
        api.post("/documents", json={"text": "First fact.", "id": "a", "wait": False})
        crashed_ids = [f"doc{i}" for i in range(5)]
        for doc_id in crashed_ids:
            assert api.post("/documents", json={"text": f"Fact {doc_id}.", "id": doc_id}).status_code == 202
        assert learned_ids(crashed) == []
        crashed.close(checkpoint=False)  # what kill -9 leaves: the journal, no snapshot
    restarted = make_engine(tmp_path)
    with client(restarted) as api:
        assert restarted.wait_replayed(60)
        assert learned_ids(restarted) == ["a", *crashed_ids], "every acknowledged document, once, in order"
        assert restarted.counters["replayed"] == 6
        assert api.post("/documents", json={"text": "Fact doc0.", "id": "doc0"}).status_code == 409
        api.post("/documents", json={"text": "Later fact.", "id": "later", "wait": True})
    again = make_engine(tmp_path)  # clean shutdown: a snapshot holds everything, nothing is replayed
    with client(again):
        assert learned_ids(again) == ["a", *crashed_ids, "later"]
        assert again.counters["replayed"] == 0
        assert json.loads((tmp_path / "current.json").read_text())["seq"] == 7
        assert list(again._journal.entries()) == [], "the journal was compacted past the snapshot"


def test_a_crash_after_a_snapshot_replays_only_the_tail(tmp_path):
    engine = make_engine(tmp_path, checkpoint_every=2)
    with client(engine) as api:
        for i in range(3):
            api.post("/documents", json={"text": f"Fact {i}.", "id": f"d{i}", "wait": True})
        assert json.loads((tmp_path / "current.json").read_text())["seq"] == 2
        engine.close(checkpoint=False)
    restarted = make_engine(tmp_path)
    with client(restarted):
        assert restarted.wait_replayed(60)
        assert learned_ids(restarted) == ["d0", "d1", "d2"] and restarted.counters["replayed"] == 1


def test_a_restart_is_ready_before_a_slow_replay_and_learns_the_backlog_once_in_order(tmp_path):
    """A long journal tail must not hold readiness back (on a slow machine replaying a backlog of documents
    took longer than any readiness probe waits): the replay runs in the writer, ahead of later writes."""
    crashed = make_engine(tmp_path, start_writer=False)
    with client(crashed) as api:
        for i in range(3):
            assert api.post("/documents", json={"text": f"Fact {i}.", "id": f"b{i}"}).status_code == 202
        crashed.close(checkpoint=False)
    session = tiny_session()
    gate = threading.Event()
    learn = session.learn

    def slow_learn(document):
        assert gate.wait(60)
        return learn(document)

    session.learn = slow_learn
    restarted = make_engine(tmp_path, session=session)
    started = threading.Thread(target=restarted.start, kwargs={"background": False}, daemon=True)
    started.start()
    started.join(30)
    try:
        assert not started.is_alive(), "start() waited for the replay"
        api = TestClient(create_app(restarted, manage=False))
        assert api.get("/ready").status_code == 200
        assert api.post("/documents", json={"text": "Again.", "id": "b1"}).status_code == 409
        assert api.post("/documents", json={"text": "After.", "id": "after"}).status_code == 202
        assert sorted(restarted._pending) == ["after", "b0", "b1", "b2"], "the backlog is queued"
        gate.set()
        assert restarted.wait_replayed(60)
        api.post("/documents", json={"text": "Last.", "id": "last", "wait": True})
        assert learned_ids(restarted) == ["b0", "b1", "b2", "after", "last"]
    finally:
        gate.set()
        restarted.close()


def test_a_reset_is_durable_and_orders_with_queued_documents(tmp_path):
    engine = make_engine(tmp_path)
    with client(engine) as api:
        api.post("/documents", json={"text": "Old fact.", "id": "old"})
        assert api.delete("/documents").json() == {"reset": True}
        api.post("/documents", json={"text": "New fact.", "id": "new"})
        engine.close(checkpoint=False)
    restarted = make_engine(tmp_path)
    with client(restarted):
        assert restarted.wait_replayed(60)
        assert learned_ids(restarted) == ["new"]


def test_a_full_queue_answers_429_and_changes_nothing(tmp_path):
    engine = make_engine(tmp_path, start_writer=False, queue_size=2)
    with client(engine) as api:
        assert api.post("/documents", json={"text": "one", "id": "1"}).status_code == 202
        assert api.post("/documents", json={"text": "two", "id": "2"}).status_code == 202
        before = engine.fingerprint()
        refused = api.post("/documents", json={"text": "three", "id": "3"})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "queue_full" and refused.headers["retry-after"] == "1"
        assert api.delete("/documents").status_code == 429
        assert engine.fingerprint() == before
        many = b"".join(b'{"text": "t%d"}\n' % i for i in range(3))
        assert api.post("/documents/upload", files={"file": ("many.jsonl", many)}).status_code == 413
        assert [d["status"] for d in api.get("/documents").json()["documents"]] == ["queued", "queued"]


def test_the_state_directory_is_locked_while_served(tmp_path):
    with client(make_engine(tmp_path)):
        with pytest.raises(StateDirBusy, match="in use"):
            make_engine(tmp_path).start(background=False)
    with client(make_engine(tmp_path)):  # released on close
        pass


def test_a_generation_queue_bound_and_the_context_limit(tmp_path):
    engine = make_engine(tmp_path)
    with client(engine) as api:
        refused = api.post("/ask", json={"question": "word " * 300})
        assert (
            refused.status_code == 400 and "exceeds the model's context" in refused.json()["error"]["message"]
        )
        with pytest.raises(ServiceError, match="between 1 and"):
            engine.generate("hi", max_new_tokens=10_000)


def test_the_lock_lets_readers_share_and_a_writer_exclude():
    import threading
    import time

    lock, inside, events = ReadWriteLock(), [], []

    def reader(i):
        with lock.read():
            inside.append(i)
            time.sleep(0.05)
            events.append(("r", len(inside)))
            inside.remove(i)

    def writer():
        with lock.write():
            events.append(("w", len(inside)))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.01)
    w = threading.Thread(target=writer)
    w.start()
    for t in [*threads, w]:
        t.join()
    assert max(n for kind, n in events if kind == "r") >= 2, "readers overlap"
    assert [n for kind, n in events if kind == "w"] == [0], "the writer runs alone"


def test_a_new_state_directory_starts_from_a_checkpoint_and_a_checkpoint_dir_is_refused(tmp_path):
    from continual_transformer.documents import make_document
    from continual_transformer.service.engine import Engine
    from continual_transformer.service.settings import ServiceConfig
    from continual_transformer.service.store import ServiceStartError

    learned = tiny_session()
    learned.learn(make_document("A fact learned offline.", "offline"))
    learned.save(tmp_path / "learned")
    with pytest.raises(ServiceStartError, match="is a checkpoint directory"):
        make_engine(tmp_path / "learned").start(background=False)
    engine = Engine(
        ServiceConfig(state_dir=tmp_path / "serve"), session=tiny_session(), init_from=tmp_path / "learned"
    )
    with client(engine):
        assert learned_ids(engine) == ["offline"]
    restarted = make_engine(tmp_path / "serve")
    with client(restarted):
        assert learned_ids(restarted) == ["offline"], "from its own snapshot now"


def test_forgetting_one_document_removes_its_chunks_durably(tmp_path):
    only_b = tiny_session("retrieval")
    only_b.learn(make_document(FACTS["b"], "b"))
    engine = make_engine(tmp_path, session=tiny_session("retrieval"))
    with client(engine) as api:
        for doc_id, text in FACTS.items():
            api.post("/documents", json={"text": text, "id": doc_id, "wait": True})
        strategy = engine.session.strategy
        assert len(set(strategy.chunk_doc)) == 2
        assert api.delete("/documents/a").json() == {"forgotten": "a"}
        assert strategy.doc_ids == ["b"] and set(strategy.chunk_doc) == {0}
        assert strategy.chunk_ids == only_b.strategy.chunk_ids, "a's chunks are gone, b's unchanged"
        question = "Where is the Velorian archive?"
        assert api.post("/ask", json={"question": question}).json()["answer"] == only_b.ask(question)
        assert [d["id"] for d in api.get("/documents").json()["documents"]] == ["b"]
        assert api.delete("/documents/a").status_code == 404
        engine.close(checkpoint=False)  # what kill -9 leaves right after the acknowledgement
    restarted = make_engine(tmp_path, session=tiny_session("retrieval"))
    with client(restarted) as api:
        assert restarted.wait_replayed(60)
        assert learned_ids(restarted) == ["b"] and restarted.session.strategy.doc_ids == ["b"]
        learned = api.post("/documents", json={"text": FACTS["a"], "id": "a", "wait": True}).json()
        assert learned["documents"][0]["tokens"] > 0, "a forgotten text is learned anew"
        assert restarted.session.strategy.doc_ids == ["b", "a"]


FACTS = {
    "a": "The Velorian archive is kept in Tarnhelm under the old bridge.",
    "b": "The Velorian archive moved to Quenmark in the spring.",
}
