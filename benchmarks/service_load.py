"""Load, crash, fuzz and auth checks of ``ctt serve`` against real server processes on loopback.

1. load: ``--clients`` concurrent clients mix questions and documents for ``--seconds``; throughput,
   p50/p99 latency per kind, errors, and every acknowledged document learned exactly once.
2. crash: the server is SIGKILLed at a random moment while clients send documents, ``--crash-rounds`` times;
   after each restart every document acknowledged so far must be learned exactly once.
3. fuzz: ``--fuzz`` generated bad requests across the endpoints: no server error (no 5xx but 503/504,
   which say "busy"), and no change to the learned state or the journal.
4. auth: requests without or with a wrong token are refused (401) and the right one accepted; a server bound
   beyond loopback without a token turns auth on by itself.

Runs on the packaged model (``--model``) or on a random tiny model (``--tiny``). Writes ``results.json`` and
``results.md`` under ``--out``.

    PYTHONPATH=src python benchmarks/service_load.py --tiny --seconds 15 --crash-rounds 5
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

TOKEN = "bench-token-0123456789abcdef"


# -- the server process --------------------------------------------------------------------------------------
def tiny_backbone():
    """A random 4-layer Llama with a byte-level BPE tokenizer trained in memory (offline, seconds)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from continual_transformer.backbone import Backbone
    from continual_transformer.config import GenerationConfig

    corpus = ["The capital of Veloria is Tarnhelm. Fact number 0123456789 about documents and questions."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config).eval()
    return Backbone(model, tokenizer, name="tiny-llama", generation=GenerationConfig(max_new_tokens=8))


def serve_child(args: argparse.Namespace) -> None:
    """The server process (``--serve-child``)."""
    import logging

    from continual_transformer.config import load_config
    from continual_transformer.service.run import serve

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {"strategy": args.strategy}
    backbone = None
    if args.tiny:
        backbone = tiny_backbone()
        overrides["generation"] = {"max_new_tokens": 8}
        overrides["strategies"] = {"in_context": {"max_context_tokens": 256}}
    else:
        overrides["model"] = {"name": args.model}
    serve(
        load_config(overrides=overrides),
        host=args.host,
        port=args.port,
        state_dir=args.state,
        token=args.token or None,
        queue_size=args.queue_size,
        checkpoint_interval=2.0,
        backbone=backbone,
        log_level="warning",
        checkpoint_every=25,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A ``ctt serve`` child process on a state directory."""

    def __init__(self, args: argparse.Namespace, state: Path, *, host="127.0.0.1", token: str | None = TOKEN):
        self.args, self.state, self.host, self.token = args, state, host, token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> float:
        command = [
            sys.executable,
            __file__,
            "--serve-child",
            "--state",
            str(self.state),
            "--port",
            str(self.port),
        ]
        command += ["--host", self.host, "--strategy", self.args.strategy, "--model", self.args.model]
        command += ["--queue-size", str(self.args.queue_size), "--token", self.token or ""]
        command += ["--tiny"] if self.args.tiny else []
        self.state.parent.mkdir(parents=True, exist_ok=True)
        log = self.state.parent / f"{self.state.name}.log"
        started = time.perf_counter()
        with open(log, "ab") as handle:
            self.proc = subprocess.Popen(
                command, stdout=handle, stderr=handle, env={**os.environ, "HF_HUB_OFFLINE": "1"}
            )
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


def history_counts(server: Server) -> collections.Counter:
    records = httpx.get(f"{server.url}/history", headers=server.headers(), timeout=600).json()["history"]
    return collections.Counter(r["doc_id"] for r in records)


def probe_answers(server: Server) -> list[str]:
    """Greedy answers to the probe questions (the state's answers, compared across a restart)."""
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=600) as http:
        return [http.post("/ask", json={"question": q}).json()["answer"] for q in QUESTIONS]


def wait_drained(server: Server, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # /info waits for the learning step in progress (the read lock): slow on a busy CPU
            info = httpx.get(f"{server.url}/info", headers=server.headers(), timeout=120).json()
        except httpx.TimeoutException:
            continue
        journal = info["journal"]
        if info["queue"]["waiting"] == 0 and journal["applied_seq"] >= journal["next_seq"] - 1:
            return
        time.sleep(0.2)
    raise RuntimeError("the learning queue did not drain")


def exactly_once(acked: set[str], counts: collections.Counter) -> dict[str, int]:
    return {
        "acknowledged": len(acked),
        "missing": sum(1 for i in acked if counts[i] == 0),
        "duplicated": sum(1 for n in counts.values() if n > 1),
    }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- 1. load -------------------------------------------------------------------------------------------------
QUESTIONS = [
    "What is the capital of Veloria?",
    "Which river flows through Quenmark?",
    "Who was born in Brastow?",
]


def run_load(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    latencies: dict[str, list[float]] = {"ask": [], "learn": []}
    statuses: collections.Counter = collections.Counter()
    acked: set[str] = set()
    lock = threading.Lock()
    stop_at = time.monotonic() + args.seconds

    def client(index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(
            base_url=server.url, headers=server.headers(), timeout=args.request_timeout
        ) as http:
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                learn = rng.random() < args.learn_fraction
                start = time.perf_counter()
                try:
                    if learn:
                        doc_id = f"load-{index}-{n}"
                        text = f"Fact {doc_id}: client {index} at step {n} holds code {rng.randrange(10**6)}."
                        response = http.post("/documents", json={"text": text, "id": doc_id})
                    else:
                        response = http.post("/ask", json={"question": rng.choice(QUESTIONS)})
                    status = response.status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                elapsed = time.perf_counter() - start
                with lock:
                    statuses[(("learn" if learn else "ask"), status)] += 1
                    if status in (200, 202):
                        latencies["learn" if learn else "ask"].append(elapsed)
                        if learn:
                            acked.add(doc_id)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    wait_drained(server)
    check = exactly_once(acked, history_counts(server))
    ok = sum(len(v) for v in latencies.values())
    errors = sum(n for (kind, status), n in statuses.items() if status not in (200, 202, 429))
    return {
        "clients": args.clients,
        "seconds": round(elapsed, 2),
        "requests_ok": ok,
        "throughput_rps": round(ok / elapsed, 2),
        "asks": len(latencies["ask"]),
        "learns_acknowledged": len(latencies["learn"]),
        "shed_429": sum(n for (kind, status), n in statuses.items() if status == 429),
        "errors": errors,
        "statuses": {f"{kind}:{status}": n for (kind, status), n in sorted(statuses.items(), key=str)},
        "latency_ms": {
            kind: {
                "p50": _ms(percentile(values, 0.50)),
                "p99": _ms(percentile(values, 0.99)),
                "mean": _ms(statistics.fmean(values) if values else None),
            }
            for kind, values in latencies.items()
        },
        "exactly_once": check,
        "passed": errors == 0 and check["missing"] == 0 and check["duplicated"] == 0,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# -- 2. crash ------------------------------------------------------------------------------------------------
def run_crash(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    rng = random.Random(1)
    acked: set[str] = set()
    rounds = []
    for r in range(args.crash_rounds):
        server = Server(args, state)
        start_seconds = server.start()
        replay_started = time.perf_counter()
        wait_drained(server)  # the journal tail is learned again after readiness
        replay_seconds = time.perf_counter() - replay_started
        counts = history_counts(server)
        check = exactly_once(acked, counts)
        # A kill with nothing in flight: the restored state must answer exactly as the killed one did.
        before = probe_answers(server)
        server.kill()
        server = Server(args, state)
        server.start()
        wait_drained(server)
        check["answers_unchanged"] = probe_answers(server) == before
        stop = threading.Event()
        round_acked: set[str] = set()
        lock = threading.Lock()

        def sender(
            index: int,
            server: Server = server,
            stop: threading.Event = stop,
            r: int = r,
            lock: threading.Lock = lock,
            round_acked: set[str] = round_acked,
        ) -> None:
            n = 0
            with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as http:
                while not stop.is_set() and (not args.crash_docs or n < args.crash_docs):
                    n += 1
                    doc_id = f"crash-{r}-{index}-{n}"
                    try:
                        response = http.post(
                            "/documents", json={"text": f"Crash fact {doc_id}.", "id": doc_id}
                        )
                    except httpx.HTTPError:
                        return  # killed mid-request: unknown outcome, not acknowledged
                    if response.status_code == 202:
                        with lock:
                            round_acked.add(doc_id)

        threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.2, 1.5))
        server.kill()
        stop.set()
        for t in threads:
            t.join()
        acked |= round_acked
        rounds.append(
            {
                "round": r,
                "restart_s": round(start_seconds, 2),
                "replay_s": round(replay_seconds, 2),
                "acked_this_round": len(round_acked),
                **check,
            }
        )
    server = Server(args, state)
    server.start()
    wait_drained(server)
    final = exactly_once(acked, history_counts(server))
    server.stop()
    failed = [x for x in rounds if x["missing"] or x["duplicated"] or not x["answers_unchanged"]]
    restarts = [x["restart_s"] for x in rounds]
    return {
        "rounds": args.crash_rounds,
        "docs_per_sender": args.crash_docs or None,
        "restart_s_max": max(restarts, default=None),
        "replay_s_max": max((x["replay_s"] for x in rounds), default=None),
        "acknowledged": len(acked),
        "final": final,
        "failed_rounds": len(failed),
        "per_round": rounds,
        "passed": not failed and final["missing"] == 0 and final["duplicated"] == 0,
    }


# -- 3. fuzz -------------------------------------------------------------------------------------------------
ROUTES = [
    ("POST", "/documents"),
    ("POST", "/ask"),
    ("POST", "/generate"),
    ("POST", "/checkpoints"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/api/chat"),
    ("POST", "/api/generate"),
    ("POST", "/api/show"),
    ("POST", "/documents/upload"),
]
WEIRD = [
    "",
    " ",
    "\x00",
    "\ud800",
    "a\nb",
    "\u202e",
    "x" * 300,
    "../..",
    "/etc/passwd",
    "null",
    "1e999",
    "🦊",
]
BAD_CHECKPOINT_NAMES = [
    "",
    " ",
    "\x00",
    "a/b",
    ".hidden",
    "..",
    "x" * 65,
    "/etc/passwd",
    "../..",
    "🦊",
    None,
    3,
    ["x"],
]
BAD_PATH_IDS = ["%00", "..%2F..", "x" * 300, "%F0%9F%A6%8A", "a%0Ab", "nope", "%2Fetc%2Fpasswd"]
BAD_UPLOADS = [
    ("x.bin", b"plain text"),
    ("", b"plain text"),
    (".h.txt", b"plain text"),
    ("a.txt", b""),
    ("a.txt", b"  \n"),
    ("a.txt", b"\x00\x01binary"),
    ("a.txt", b"\xff\xfe not utf-8"),
    ("b.jsonl", b"{broken\n"),
    ("b.jsonl", b"[1]\n"),
    ("b.jsonl", b'{"id": 1}\n'),
    ("b.jsonl", b'{"text": 5}\n'),
]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**63, -(2**70), rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e-300, rng.uniform(-1e6, 1e6)])
    if kind in (4, 5):
        return (
            rng.choice(WEIRD)
            if rng.random() < 0.5
            else "".join(chr(rng.randrange(1, 0x3000)) for _ in range(8))
        )
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = [
        "text",
        "id",
        "model",
        "messages",
        "prompt",
        "question",
        "prompts",
        "name",
        "stream",
        "options",
        "wait",
    ]
    return {rng.choice(keys + WEIRD): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def invalid_body(rng: random.Random, path: str, model: str) -> Any:
    """A body for ``path`` that must be refused (state-changing routes) or may be anything (answers)."""
    if path == "/documents":
        broken = rng.choice(["text", "id", "source", "wait", "extra"])
        body: dict[str, Any] = {"text": "A valid fact."}
        not_strings = [1, 2.5, True, [], {}, ["list"]]
        if broken == "text":
            body["text"] = rng.choice([*not_strings, None, "", " ", "\x00", "\ud800"])
        elif broken == "id":
            body["id"] = rng.choice([*not_strings, "", " ", "a\nb", "\ud800", "x" * 300])
        elif broken == "source":
            body["source"] = rng.choice([*not_strings, "\ud800", "y" * 2000])
        elif broken == "wait":
            body["wait"] = rng.choice([1, "yes", 0.5, [], {}])
        else:
            body["surprise"] = random_value(rng)
        return body
    if path == "/checkpoints":
        return {"name": rng.choice(BAD_CHECKPOINT_NAMES)}
    if path.startswith(("/v1/", "/api/")) and rng.random() < 0.5:
        body = {"model": model, "messages": random_value(rng), "prompt": random_value(rng)}
        body[rng.choice(["stream", "max_tokens", "options", "n", "messages"])] = random_value(rng)
        return body
    return random_value(rng)


def run_fuzz(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    rng = random.Random(2)
    model = httpx.get(f"{server.url}/v1/models", headers=server.headers()).json()["data"][0]["id"]
    before = httpx.get(f"{server.url}/info", headers=server.headers()).json()
    statuses: collections.Counter = collections.Counter()
    server_errors: list[dict[str, Any]] = []
    lock = threading.Lock()
    per_thread = args.fuzz // 4

    def fuzzer(index: int) -> None:
        local = random.Random(rng.randrange(2**32) + index)
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=60) as http:
            for _ in range(per_thread):
                method, path = local.choice(ROUTES)
                choice = local.random()
                kwargs: dict[str, Any]
                if path == "/documents/upload":
                    kwargs = {"files": {"file": local.choice(BAD_UPLOADS)}}
                elif choice < 0.15:
                    kwargs = {"content": bytes(local.randrange(256) for _ in range(local.randrange(64)))}
                elif choice < 0.2:
                    method = local.choice(["GET", "DELETE", "PUT", "PATCH", "POST"])
                    path = local.choice(["/documents/", "/checkpoints/"]) + local.choice(BAD_PATH_IDS)
                    path += "/load" if path.startswith("/checkpoints/") else ""
                    kwargs = {}
                else:
                    body = invalid_body(local, path, model)
                    kwargs = {"content": json.dumps(body).encode("utf-8", "surrogatepass")}
                if "content" in kwargs:
                    kwargs["headers"] = {"content-type": local.choice(["application/json", "text/plain", ""])}
                try:
                    response = http.request(method, path, **kwargs)
                    status: Any = response.status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    statuses[status] += 1
                    if (isinstance(status, int) and status >= 500) or not isinstance(status, int):
                        if status != 503 and status != 504:
                            server_errors.append({"method": method, "path": path, "status": status})

    threads = [threading.Thread(target=fuzzer, args=(i,)) for i in range(4)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = httpx.get(f"{server.url}/info", headers=server.headers()).json()

    def state(info: dict[str, Any]) -> dict[str, Any]:  # snapshots may be taken meanwhile: not a change
        return {
            "documents": info["documents"],
            **{k: info["journal"][k] for k in ("next_seq", "applied_seq")},
        }

    changed = {k: (v, state(after)[k]) for k, v in state(before).items() if state(after)[k] != v}
    return {
        "requests": sum(statuses.values()),
        "seconds": round(time.perf_counter() - started, 2),
        "statuses": {str(k): n for k, n in sorted(statuses.items(), key=str)},
        "server_errors": len(server_errors),
        "server_error_examples": server_errors[:10],
        "state_changes": changed,
        "passed": not server_errors and not changed and statuses.get(500, 0) == 0,
    }


# -- 4. auth -------------------------------------------------------------------------------------------------
def run_auth(args: argparse.Namespace, server: Server, state: Path) -> dict[str, Any]:
    checks: dict[str, bool] = {}
    url = server.url
    for path in ("/documents", "/info", "/v1/models", "/api/tags"):
        checks[f"{path} without token -> 401"] = httpx.get(url + path).status_code == 401
        wrong = {"Authorization": "Bearer not-the-token"}
        checks[f"{path} wrong token -> 401"] = httpx.get(url + path, headers=wrong).status_code == 401
        checks[f"{path} right token -> 200"] = (
            httpx.get(url + path, headers=server.headers()).status_code == 200
        )
    checks["/health open"] = httpx.get(url + "/health").status_code == 200
    wide = Server(args, state, host="0.0.0.0", token=None)  # no token given beyond loopback
    wide.start()
    try:
        checks["beyond loopback without --token: auth on (401)"] = (
            httpx.get(wide.url + "/info").status_code == 401
        )
        generated = (state / "token").read_text().strip()
        checks["generated token works"] = (
            httpx.get(wide.url + "/info", headers={"Authorization": f"Bearer {generated}"}).status_code == 200
        )
        checks["token file is private (0600)"] = (os.stat(state / "token").st_mode & 0o777) == 0o600
    finally:
        wide.stop()
    return {"checks": checks, "passed": all(checks.values())}


# -- report --------------------------------------------------------------------------------------------------
def write_report(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"# ctt serve: load, crash, fuzz, auth ({results['model']}, strategy {results['strategy']})", ""]
    if "load" in results:
        load = results["load"]
        lines += [
            "## Load",
            "",
            f"{load['clients']} clients for {load['seconds']} s: {load['throughput_rps']} requests/s "
            f"({load['asks']} answers, {load['learns_acknowledged']} documents acknowledged), "
            f"{load['errors']} errors, {load['shed_429']} shed with 429.",
            "",
            "| kind | p50 ms | p99 ms | mean ms |",
            "|---|---|---|---|",
            *[f"| {k} | {v['p50']} | {v['p99']} | {v['mean']} |" for k, v in load["latency_ms"].items()],
            "",
            f"Exactly once: {load['exactly_once']} -> {'PASS' if load['passed'] else 'FAIL'}",
            "",
        ]
    if "crash" in results:
        crash = results["crash"]
        lines += [
            "## Crash (SIGKILL while learning)",
            "",
            f"{crash['rounds']} kills, {crash['acknowledged']} documents acknowledged in all; final check "
            f"{crash['final']}; rounds failing: {crash['failed_rounds']} -> "
            f"{'PASS' if crash['passed'] else 'FAIL'}",
            "",
            f"Slowest restart to ready: {crash['restart_s_max']} s; slowest replay of the journal tail after "
            f"readiness: {crash['replay_s_max']} s; documents per sender and round: "
            f"{crash['docs_per_sender'] or 'until the kill'}. Before each such kill, a kill with nothing in "
            "flight: the restored state answered the probe questions exactly as before in "
            f"{sum(bool(x.get('answers_unchanged')) for x in crash['per_round'])} of {crash['rounds']} "
            "rounds.",
            "",
        ]
    if "fuzz" in results:
        fuzz = results["fuzz"]
        lines += [
            "## Fuzz",
            "",
            f"{fuzz['requests']} bad requests in {fuzz['seconds']} s: server errors {fuzz['server_errors']}, "
            f"state changes {fuzz['state_changes'] or 'none'} -> {'PASS' if fuzz['passed'] else 'FAIL'}",
            "",
            f"Statuses: {fuzz['statuses']}",
            "",
        ]
    if "auth" in results:
        auth = results["auth"]
        lines += ["## Auth", "", *[f"- {k}: {'ok' if v else 'FAIL'}" for k, v in auth["checks"].items()], ""]
    (out / "results.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="packaged model name or HF id")
    parser.add_argument("--tiny", action="store_true", help="a random tiny model instead (fast, offline)")
    parser.add_argument("--strategy", default="in_context")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--learn-fraction", type=float, default=0.2)
    parser.add_argument("--crash-rounds", type=int, default=20)
    parser.add_argument(
        "--crash-docs",
        type=int,
        default=0,
        help="documents each of the 4 crash senders sends per round at most (0: until the kill)",
    )
    parser.add_argument("--fuzz", type=int, default=10_000)
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--phases", default="load,crash,fuzz,auth")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/service"))
    parser.add_argument("--work", type=Path, default=None, help="state directories (default: a temp dir)")
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--token", default=TOKEN, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_child:
        serve_child(args)
        return
    args.seconds = min(args.seconds, 600.0)
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="ctt-service-bench-"))
    phases = set(args.phases.split(","))
    results: dict[str, Any] = {
        "model": "tiny-llama (random)" if args.tiny else args.model,
        "strategy": args.strategy,
    }
    if phases & {"load", "fuzz", "auth"}:
        server = Server(args, work / "main")
        results["startup_s"] = round(server.start(), 2)
        try:
            if "load" in phases:
                results["load"] = run_load(args, server)
                print("load:", json.dumps({k: v for k, v in results["load"].items() if k != "statuses"}))
            if "fuzz" in phases:
                results["fuzz"] = run_fuzz(args, server)
                print("fuzz:", json.dumps({k: v for k, v in results["fuzz"].items() if "example" not in k}))
            if "auth" in phases:
                results["auth"] = run_auth(args, server, work / "wide")
                print("auth:", results["auth"]["passed"])
        finally:
            server.stop()
    if "crash" in phases:
        results["crash"] = run_crash(args, work / "crash")
        print("crash:", json.dumps({k: v for k, v in results["crash"].items() if k != "per_round"}))
    results["passed"] = all(results[p]["passed"] for p in ("load", "crash", "fuzz", "auth") if p in results)
    write_report(results, args.out)
    print(f"{'PASS' if results['passed'] else 'FAIL'}; wrote {args.out}/results.json and results.md")
    sys.exit(0 if results["passed"] else 1)


if __name__ == "__main__":
    main()
