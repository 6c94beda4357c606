"""The ``openai`` engine against a real HTTP server on loopback, with injected faults and interrupted runs.

``FakeServer`` is an OpenAI-compatible ``/v1/chat/completions`` (stdlib ``ThreadingHTTPServer`` on
127.0.0.1, port 0) whose answers are a function of the request body only, so a run's output does not
depend on the order in which requests arrive. Transient faults (429 + Retry-After, 500, an answer slower
than the client's timeout, malformed JSON, a dropped connection) hit the *first* copy of a chosen subset
of requests only, so they cost retries and nothing else. ``benchmarks/chains_served.py`` reuses it.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from rankloss.chains import make_chains_file, read_chains
from rankloss.chains.served import ServedEngine, ServerConfigError
from rankloss.chains.taxonomy import EDIT_TYPE_DESCRIPTIONS

ROOT = Path(__file__).resolve().parents[1]
_DESC_TO_TYPE = {d: t for t, d in EDIT_TYPE_DESCRIPTIONS.items()}
_REPLACE = {"object": "lamp", "attribute": "purple", "count": "seven", "action": "jumps", "spatial": "behind"}
FAULTS = ("429", "500", "slow", "malformed", "drop")


def _h(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "big")


def fake_answer(prompt: str, temperature: float, seed: object) -> str:
    """A deterministic one-word edit of the prompt's caption (about 1 in 6 fails verification)."""
    m = re.search(r"kind: (.*)\.\nChange as few", prompt)
    etype = _DESC_TO_TYPE.get(m.group(1) if m else "", "object")
    caption = prompt.split("\nCaption: ", 1)[1].rsplit("\nRewritten caption:", 1)[0]
    h = _h(prompt, temperature, seed)
    if h % 6 == 0:
        return caption  # "unchanged": rejected by the verification
    if etype == "order":
        sents = re.split(r"(?<=[.!?])\s+", caption)
        if len(sents) >= 2:
            i = h % (len(sents) - 1)
            sents[i], sents[i + 1] = sents[i + 1], sents[i]
        return " ".join(sents)
    protected = (
        re.findall(r'"([^"]*)"', prompt.split("Do not change these parts:", 1)[1])
        if ("Do not change these parts:" in prompt)
        else []
    )
    blocked = []
    for p in protected:
        for pm in re.finditer(re.escape(p), caption):
            blocked.append((pm.start() - 2, pm.end() + 2))
    words = [w for w in re.finditer(r"[A-Za-z]+", caption)
             if not any(a < w.end() and w.start() < b for a, b in blocked)]  # fmt: skip
    if not words:
        return caption
    w = words[h % len(words)]
    if etype == "insertion":
        new = caption[: w.start()] + "quietly " + caption[w.start() :]
    elif etype == "omission":
        end = w.end() + 1 if caption[w.end() : w.end() + 1] == " " else w.end()
        new = caption[: w.start()] + caption[end:]
    else:
        rep = _REPLACE[etype] if w.group() != _REPLACE[etype] else "table"
        new = caption[: w.start()] + rep + caption[w.end() :]
    return f"Rewritten caption: {new}" if h % 5 == 1 else new


class FakeServer:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 (a context manager)."""

    def __init__(self, *, latency: float = 0.0, fault_every: int = 0, faults=FAULTS, slow: float = 1.0,
                 always_500: str | None = None, status: int | None = None,
                 retry_after: str = "0"):  # fmt: skip
        self.latency, self.fault_every, self.faults, self.slow = latency, fault_every, tuple(faults), slow
        self.always_500, self.status, self.retry_after = always_500, status, retry_after
        self.seen: set[bytes] = set()
        self.injected: Counter[str] = Counter()
        self.auth: set[str] = set()
        self.requests = 0
        self.lock = threading.Lock()
        # hold_when(): while it returns True, each new request waits (unanswered) until release() — a run
        # that must still be going when the test interrupts it cannot finish behind the test's back
        self.hold_when: Callable[[], bool] | None = None
        self.released = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as real servers do: no 40 ms delayed-ACK stalls

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    server.handle(self, body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a "slow" answer)
                    self.close_connection = True

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 256  # the default 5 refuses connections under --concurrency 32

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _send(self, h, status: int, payload: bytes, headers=()) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        for k, v in headers:
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(payload)

    def release(self) -> None:
        self.hold_when = None
        self.released.set()

    def handle(self, h, body: bytes) -> None:
        hold = self.hold_when
        if hold is not None and hold():
            self.released.wait(60)
        key = hashlib.sha256(body).digest()
        with self.lock:
            self.requests += 1
            self.auth.add(h.headers.get("Authorization", ""))
            first = key not in self.seen
            self.seen.add(key)
        if h.path != "/v1/chat/completions":
            return self._send(h, 404, b'{"error": "not found"}')
        if self.status is not None:
            return self._send(h, self.status, b'{"error": "no"}')
        req = json.loads(body)
        prompt = req["messages"][0]["content"]
        if self.always_500 and self.always_500 in prompt:
            return self._send(h, 500, b'{"error": "boom"}')
        hk = int.from_bytes(key[:8], "big")
        if first and self.fault_every and hk % self.fault_every == 0:
            fault = self.faults[(hk // self.fault_every) % len(self.faults)]
            with self.lock:
                self.injected[fault] += 1
            if fault == "429":
                return self._send(h, 429, b'{"error": "slow down"}', [("Retry-After", self.retry_after)])
            if fault == "500":
                return self._send(h, 500, b'{"error": "internal"}')
            if fault == "malformed":
                return self._send(h, 200, b'{"choices": [{"message": {"content": ')
            if fault == "drop":
                h.close_connection = True
                h.connection.shutdown(2)
                return None
            if fault == "slow":
                time.sleep(self.slow)
        if self.latency:
            time.sleep(self.latency)
        text = fake_answer(prompt, req.get("temperature"), req.get("seed"))
        payload = json.dumps({"id": "x", "object": "chat.completion", "model": req["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": text}}]})  # fmt: skip
        self._send(h, 200, payload.encode())


def write_captions(path: Path, n: int) -> Path:
    colours, things = ["red", "blue", "green", "white"], ["dog", "cup", "ball", "man", "car"]
    places = ["kitchen", "garden", "street", "beach"]
    with open(path, "w") as f:
        for i in range(n):
            c, t, p = colours[i % 4], things[i % 5], places[(i // 3) % 4]
            cap = (f"A {c} {t} stands near two chairs in a sunny {p}. Then the {t} moves slowly to the "
                   f"left of a small wooden table. Finally a woman in a long coat picks up {i % 7 + 2} "
                   "apples.")  # fmt: skip
            f.write(json.dumps({"id": f"v{i:03d}", "video": f"v{i:03d}.mp4", "caption": cap}) + "\n")
    return path


FAST = {"timeout": 0.4, "backoff": 0.001, "max_backoff": 0.01, "max_retry_after": 0.05}


def run(server: FakeServer, inp: Path, out: Path, **kw):
    opts = {"base_url": server.url, "model": "fake", "concurrency": 4, **FAST, **kw}
    return make_chains_file(inp, out, length=5, seed=3, engine="openai", **opts)


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    return write_captions(tmp_path_factory.mktemp("served") / "captions.jsonl", 40)


@pytest.fixture(scope="module")
def reference(captions, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("ref") / "chains.jsonl"
    with FakeServer() as srv:
        s = run(srv, captions, out, concurrency=1)
    assert s.complete and s.chains_written == 40 and s.llm_edits > 80, s.format()
    assert s.llm_rejections["unchanged"] > 0 and not s.request_retries and not s.request_failures
    return out.read_bytes()


def test_concurrency_gives_the_same_bytes_and_key_stays_secret(captions, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("RANKLOSS_TEST_KEY", "sekret-123")
    with FakeServer(latency=0.002) as srv:
        s = run(srv, captions, tmp_path / "c.jsonl", concurrency=16, api_key_env="RANKLOSS_TEST_KEY")
    assert (tmp_path / "c.jsonl").read_bytes() == reference
    assert srv.auth == {"Bearer sekret-123"}
    assert s.requests == srv.requests + s.request_retries["connection error"], s.request_retries
    assert "server:" in s.format()
    assert "sekret" not in json.dumps(s.to_dict()) + s.format()
    assert not any("sekret" in p.read_text() for p in tmp_path.iterdir())
    ids = [r["id"] for r in read_chains(tmp_path / "c.jsonl")]
    assert ids == [f"v{i:03d}" for i in range(40)]


def test_transient_faults_only_cost_retries(captions, reference, tmp_path):
    with FakeServer(fault_every=3, slow=0.6) as srv:
        s = run(srv, captions, tmp_path / "c.jsonl", concurrency=8)
    assert set(srv.injected) == set(FAULTS), srv.injected
    assert (tmp_path / "c.jsonl").read_bytes() == reference
    assert not s.request_failures, s.format()
    assert not any(k.startswith("request failed") for k in s.llm_fallback_reasons), s.format()
    expected = {"HTTP 429", "HTTP 500", "timeout", "malformed answer", "connection error"}
    assert expected <= set(s.request_retries), s.request_retries
    assert sum(s.request_retries.values()) >= sum(srv.injected.values())


def test_retry_after_is_honoured(tmp_path):
    inp = write_captions(tmp_path / "in.jsonl", 1)
    with FakeServer(fault_every=1, faults=("429",), retry_after="0.3") as srv:
        eng = ServedEngine(srv.url, "fake", backoff=0.0, max_backoff=0.0, timeout=2)
        t0 = time.monotonic()
        eng._generate("x\nCaption: a dog.\nRewritten caption:", seed=1, sample=False)
        assert time.monotonic() - t0 >= 0.3
    assert eng.request_retries_by_reason == {"HTTP 429": 1}
    assert inp.exists()


def test_failed_requests_fall_back_to_rules_with_their_reason(captions, tmp_path):
    with FakeServer(always_500="kitchen") as srv:
        s = run(srv, captions, tmp_path / "c.jsonl", request_retries=1, concurrency=8)
    assert s.complete and s.chains_written == 40
    assert s.llm_fallback_reasons["request failed: HTTP 500"] > 0
    assert s.request_failures["HTTP 500"] > 0 and s.llm_rejections["request failed: HTTP 500"] > 0
    recs = list(read_chains(tmp_path / "c.jsonl"))
    kitchen = [r for r in recs if "kitchen" in r["chain"][0]]
    assert kitchen and all(e["engine"] == "rules" for r in kitchen for e in r["edits"])
    assert all(len(r["chain"]) == 5 for r in recs)
    assert "fell back" in s.format() and "failed" in s.format()


def test_wrong_key_or_model_stops_the_run_and_resumes(captions, reference, tmp_path):
    out = tmp_path / "c.jsonl"
    with FakeServer(status=401) as srv, pytest.raises(ServerConfigError, match="HTTP 401"):
        run(srv, captions, out)
    assert not out.exists()
    with FakeServer() as srv:
        s = run(srv, captions, out)
    assert s.complete and out.read_bytes() == reference


def test_options_record_generation_settings(captions, tmp_path):
    with FakeServer() as srv:
        run(srv, captions, tmp_path / "c.jsonl", max_chains=3)
        opts = json.loads((tmp_path / "c.jsonl.partial.options.json").read_text())
        flat = json.dumps(opts)
        for k in ("model", "temperature", "top_p", "max_tokens", "send_seed", "max_retries"):
            assert k in flat, (k, opts)
        assert srv.url not in flat
        with pytest.raises(ValueError, match="temperature"):
            run(srv, captions, tmp_path / "c.jsonl", temperature=0.9)
        s = run(srv, captions, tmp_path / "c.jsonl", concurrency=2)  # concurrency may change on resume
    assert s.complete and s.chains_resumed == 3


def _cli(server: FakeServer, inp: Path, out: Path, concurrency: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rankloss", "chains", "make", "--in", str(inp), "--out", str(out),
           "--length", "5", "--seed", "3", "--engine", "openai", "--base-url", server.url, "--model", "fake",
           "--concurrency", str(concurrency), "--timeout", "0.4", "--backoff", "0.001", "--max-backoff",
           "0.01", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_lines(path: Path, n: int, proc: subprocess.Popen, limit: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.communicate()}")
        time.sleep(0.02)
    pytest.fail("no progress")


@pytest.mark.slow
def test_cli_sigint_and_sigkill_then_resume(captions, reference, tmp_path):
    out = tmp_path / "c.jsonl"
    partial = Path(str(out) + ".partial")
    with FakeServer(latency=0.03, fault_every=5, slow=0.6) as srv:
        # once 8 chains are on disk the server stops answering, so the run cannot complete before the
        # SIGINT lands (a loaded CI machine once let all 40 finish between the test's look and its signal)
        srv.hold_when = lambda: partial.exists() and partial.read_bytes().count(b"\n") >= 8
        p = _cli(srv, captions, out, 4)
        _wait_lines(partial, 8, p)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
        srv.release()
        assert p.returncode == 130, err
        assert "resume" in err and not out.exists()
        p = _cli(srv, captions, out, 8)
        _wait_lines(partial, 20, p)
        p.kill()
        p.wait(timeout=30)
        assert not out.exists()
        p = _cli(srv, captions, out, 3)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert out.read_bytes() == reference
    ids = [r["id"] for r in read_chains(out)]
    assert ids == sorted(set(ids)) and len(ids) == 40
    assert "server:" in err and "llm:" in err
