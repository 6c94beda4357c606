"""The generation scorers: :class:`EventJudge` (AutoDQ style) against a loopback OpenAI-compatible stub
server, and :class:`LexicalScorer` on hand-computed examples."""

from __future__ import annotations

import http.server
import json
import re
import threading

import pytest

from rankloss.chains.served import ServerConfigError
from rankloss.integrations.judge import (
    EventJudge,
    JudgeError,
    LexicalScorer,
    content_words,
    f1_score,
    stem,
)

FAST = {"timeout": 2.0, "backoff": 0.0, "max_backoff": 0.0}


def stub_events(caption: str) -> list[str]:
    """The stub's "event extraction": one event per sentence, lower-cased, without the final period."""
    return [s.strip().lower() for s in re.split(r"[.;]", caption) if s.strip()]


def stub_entailed(premise: str, event: str) -> bool:
    """The stub's "entailment": the premise, lower-cased, contains the event's text."""
    return event.lower() in premise.lower()


class StubJudge:
    """An OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1 that answers the judge's two prompts
    deterministically. ``faults``: a list of what the next requests get instead (``"500"``, ``"garbled"``,
    ``"wrong_count"``, ``"fenced"``, ``"object"``, ``"401"``), consumed one per request."""

    def __init__(self, faults=(), always=None):
        self.faults = list(faults)
        self.always = always
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                status, text = server.answer(self.path, body)
                payload = (
                    json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
                    if status == 200 and text is not None
                    else json.dumps({"error": text or "no"})
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, path: str, body: dict) -> tuple[int, str | None]:
        with self.lock:
            self.requests.append(body)
            fault = self.always or (self.faults.pop(0) if self.faults else None)
        if path != "/v1/chat/completions":
            return 404, "not found"
        if fault == "500":
            return 500, "boom"
        if fault == "401":
            return 401, "bad key"
        if fault == "garbled":
            return 200, "I think the events are: running, jumping"
        prompt = body["messages"][0]["content"]
        if prompt.startswith("Below is a description of a video clip.\n"):
            caption = prompt.split("Description: ", 1)[1].split("\n\nList the key events", 1)[0]
            events = stub_events(caption)
            if fault == "object":
                return 200, json.dumps({"events": events})
            text = json.dumps(events)
            return 200, f"Here you go:\n```json\n{text}\n```" if fault == "fenced" else text
        premise = prompt.split("Description: ", 1)[1].split("\n\nEvents:\n", 1)[0]
        listing = prompt.split("\n\nEvents:\n", 1)[1].split("\n\nFor each event", 1)[0]
        events = [re.sub(r"^\d+\. ", "", line) for line in listing.splitlines()]
        verdicts = ["yes" if stub_entailed(premise, e) else "no" for e in events]
        if fault == "wrong_count":
            verdicts = verdicts + ["yes"]
        if fault == "object":  # AutoDQ's own format
            return 200, json.dumps(
                {
                    "events": [
                        {"event": e, "relationship": "entailment" if v == "yes" else "contradiction"}
                        for e, v in zip(events, verdicts)
                    ]
                }
            )
        return 200, json.dumps(verdicts)


REF = "A man opens the door. A dog runs outside. The man waves."
GEN = "A man opens the door. A cat sleeps."


def test_judge_precision_recall_f1_against_the_stub():
    with StubJudge() as srv:
        judge = EventJudge(srv.url, "stub", **FAST)
        s = judge.score(GEN, REF)
        # generated events: "a man opens the door" (in REF), "a cat sleeps" (not): P = 1/2
        # reference events: 3, of which only "a man opens the door" is in GEN: R = 1/3
        assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(1 / 3)
        assert s["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
        assert s["generated_events"] == ["a man opens the door", "a cat sleeps"]
        assert s["reference_entailed"] == [True, False, False]
        scores = judge.score_pairs([(GEN, REF), (REF, REF), ("", REF)])
    assert scores.scorer == "judge"
    assert [x["precision"] for x in scores.samples] == pytest.approx([0.5, 1.0, 1.0])  # nothing claimed: 1
    assert [x["recall"] for x in scores.samples] == pytest.approx([1 / 3, 1.0, 0.0])
    # AutoDQ's summary: the harmonic mean of the mean precision and the mean recall
    assert scores.f1 == pytest.approx(f1_score((0.5 + 1 + 1) / 3, (1 / 3 + 1 + 0) / 3))
    # every request is deterministic: temperature 0 and a seed, the model named
    assert all(r["temperature"] == 0.0 and "seed" in r and r["model"] == "stub" for r in srv.requests)
    # the reference's events were extracted once (cached by text)
    extractions = [r for r in srv.requests if "List the key events" in r["messages"][0]["content"]]
    assert sum(REF in r["messages"][0]["content"] for r in extractions) == 1


@pytest.mark.parametrize("fault", ["fenced", "object"])
def test_lenient_parsing_of_fenced_and_autodq_shaped_answers(fault):
    with StubJudge(always=fault) as srv:
        s = EventJudge(srv.url, "stub", **FAST).score(GEN, REF)
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(1 / 3)


def test_garbled_answers_and_server_errors_are_retried():
    # a 500 (transport retry), a garbled answer and a wrong verdict count (asked again), then normal
    with StubJudge(faults=["500", "garbled", "ok", "wrong_count"]) as srv:
        judge = EventJudge(srv.url, "stub", request_retries=2, parse_retries=2, **FAST)
        s = judge.score(GEN, REF)
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(1 / 3)
    assert judge.client.request_retries_by_reason == {"HTTP 500": 1}


def test_errors_name_the_endpoint():
    with StubJudge(always="garbled") as srv:
        judge = EventJudge(srv.url, "stub", parse_retries=1, **FAST)
        with pytest.raises(
            JudgeError, match=r"127\.0\.0\.1.*'stub'.*event extraction.*2 tries.*no JSON list"
        ):
            judge.score(GEN, REF)
        assert len(srv.requests) == 2
    with StubJudge(always="500") as srv:
        judge = EventJudge(srv.url, "stub", request_retries=1, **FAST)
        with pytest.raises(JudgeError, match=r"chat/completions.*HTTP 500 after 1 retries"):
            judge.score(GEN, REF)
        assert len(srv.requests) == 2
    with StubJudge(always="401") as srv, pytest.raises(ServerConfigError, match="HTTP 401.*judge's URL"):
        EventJudge(srv.url, "stub", **FAST).score(GEN, REF)
    with StubJudge() as srv:
        url = srv.url
    with pytest.raises(JudgeError, match="connection error"):  # nothing listens there any more
        EventJudge(url, "stub", request_retries=0, **FAST).score(GEN, REF)


def test_judge_options_are_checked():
    with pytest.raises(ValueError, match="base_url"):
        EventJudge("localhost:8000", "m")
    with pytest.raises(ValueError, match="model"):
        EventJudge("http://localhost:8000/v1", "")
    with pytest.raises(ValueError, match="parse_retries"):
        EventJudge("http://localhost:8000/v1", "m", parse_retries=-1)
    with pytest.raises(ValueError, match="RANKLOSS_NO_SUCH_KEY"):
        EventJudge("http://localhost:8000/v1", "m", api_key_env="RANKLOSS_NO_SUCH_KEY")


def test_stemmer_and_content_words():
    assert {stem(w) for w in ("moves", "moving", "moved", "move")} == {"mov"}
    assert stem("runs") == stem("running") == "run"
    assert stem("rolling") == stem("rolls") == "roll"
    assert stem("boxes") == "box" and stem("puppies") == "puppy" and stem("red") == "red"
    assert content_words("The red ball is rolling to the left.") == ["red", "ball", "roll", "left"]


def test_lexical_scorer_hand_computed():
    lex = LexicalScorer()
    # G = {red, ball, roll, left}, R = {red, ball, roll, right, quick}: m = 3
    s = lex.score("The red ball is rolling to the left.", "A red ball rolls right, quickly.")
    assert content_words("A red ball rolls right, quickly.") == ["red", "ball", "roll", "right", "quickly"]
    assert s["precision"] == pytest.approx(3 / 4) and s["recall"] == pytest.approx(3 / 5)
    assert s["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert s["matched_words"] == ["ball", "red", "roll"]
    # multisets: "dog dog dog" against "dog cat": m = 1, P = 1/3, R = 1/2
    s = lex.score("dog dog dog", "dog cat")
    assert (s["precision"], s["recall"]) == pytest.approx((1 / 3, 1 / 2))
    # the documented weakness: swapped roles score as high as the truth
    assert lex.score("the dog chases the cat", "the cat chases the dog")["f1"] == 1.0
    # an empty side scores 1.0 on its side (AutoDQ's convention)
    s = lex.score("", "a dog runs")
    assert (s["precision"], s["recall"], s["f1"]) == (1.0, 0.0, 0.0)
    scores = lex.score_pairs([("dog dog dog", "dog cat"), ("a dog", "a dog")])
    assert scores.scorer == "lexical"
    assert scores.precision == pytest.approx((1 / 3 + 1) / 2) and scores.recall == pytest.approx(0.75)
    assert scores.f1 == pytest.approx(f1_score(scores.precision, scores.recall))
