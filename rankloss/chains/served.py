"""The ``openai`` engine: a served LLM over the OpenAI-compatible chat-completions API.

Any server that speaks ``POST {base_url}/chat/completions`` works: vLLM, SGLang, TGI, llama.cpp's
``llama-server``, Ollama (``http://localhost:11434/v1``) or a hosted API. Every step is the ``llm``
engine's step (:class:`~rankloss.chains.LLMEngine`): the same prompt, the same verification of the
answer, the same retries (greedy first, then sampling) and the same ``rules`` fallback. Only the
``generate_fn`` differs: it sends one chat-completions request.

Transport. The client is the standard library's :mod:`http.client` (no extra dependency), one
keep-alive connection per worker thread. A request that times out, loses its connection, gets a 429,
408 or 5xx, or gets an answer that is not the expected JSON is sent again after an exponential backoff
with full jitter (``backoff * 2**n``, capped at ``max_backoff``), or after the server's ``Retry-After``
when it sends one, up to ``request_retries`` times. A request that still fails is a rejected attempt
("request failed: <reason>"); when every attempt of a step fails, the step falls back to ``rules``,
counted in the summary with its reason. A 401, 403 or 404 (wrong key, URL or model name) stops the run
with an error instead: every request would fail the same way.

Concurrency. :func:`~rankloss.chains.make_chains_file` makes the chains of up to ``concurrency``
records at once (a thread pool) and writes them in input order, so the output does not depend on the
completion order. Each record's steps stay sequential (each edit needs the last).

The API key is read from the environment variable ``api_key_env`` (default ``OPENAI_API_KEY``; optional
for local servers) and is never stored in the run options, printed or logged.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .core import Chain, TextState
from .llm import LLMEngine

__all__ = ["ChatClient", "ServedEngine", "ServerConfigError", "DEFAULT_API_KEY_ENV", "request_failed"]

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_FATAL_STATUS = frozenset({401, 403, 404})


class ServerConfigError(RuntimeError):
    """The server refused every request for a reason retrying cannot fix (key, URL or model name)."""


class _RequestFailed(str):
    """What ``generate_fn`` returns for a request that failed after its retries (empty text + a reason)."""

    reason: str

    def __new__(cls, reason: str) -> _RequestFailed:
        obj = super().__new__(cls, "")
        obj.reason = reason
        return obj


class _StepEngine(LLMEngine):
    """An :class:`LLMEngine` for one chain: names a failed request, remembers why a step fell back."""

    def __init__(self, *args: Any, fallback_reasons: Counter[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_reason = ""
        self._fallback_reasons = fallback_reasons
        rules = self._rules
        outer = self

        class _Fallback:  # the rules engine, counting why each fallback step happened
            def edit_step(self, *a: Any, **k: Any) -> Any:
                outer._fallback_reasons[outer._last_reason or "unknown"] += 1
                return rules.edit_step(*a, **k)

        self._rules = _Fallback()  # type: ignore[assignment]

    def verify(self, state: TextState, answer: str, edit_type: str) -> tuple | str:
        if isinstance(answer, _RequestFailed):
            verdict: tuple | str = f"request failed: {answer.reason}"
        else:
            verdict = super().verify(state, answer, edit_type)
        if isinstance(verdict, str):
            self._last_reason = verdict
        return verdict


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ChatClient:
    """A client of one OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint, with retries.

    The transport the ``openai`` chains engine and :class:`rankloss.integrations.judge.EventJudge` share:
    the standard library's :mod:`http.client`, one keep-alive connection per thread (thread-safe). A
    request that times out, loses its connection, gets a 429, 408, 409, 425 or 5xx, or an answer that is
    not a chat completion is sent again after an exponential backoff with full jitter (``backoff * 2**n``
    capped at ``max_backoff``, or the server's ``Retry-After``, capped at ``max_retry_after``), up to
    ``request_retries`` times. :meth:`complete` returns the first choice's text, or, for a request that
    still fails, an empty string whose ``.reason`` says why (``bool(text)`` is false; use
    :func:`request_failed`). A 401, 403 or 404 raises :class:`ServerConfigError` at once (wrong key, URL
    or model name), naming the endpoint and ``hint``.

    The API key is read from the environment variable ``api_key_env`` (``None``: no key); when it is the
    default (``OPENAI_API_KEY``) and unset no key is sent, a name given explicitly must be set. The key is
    never part of ``repr`` or of any message.

    ``requests``, ``request_retries_by_reason`` and ``request_failures`` count every request (thread-safe).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = DEFAULT_API_KEY_ENV,
        timeout: float = 60.0,
        request_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        max_retry_after: float = 120.0,
        hint: str = "check --base-url, --model and the API key variable",
    ) -> None:
        if not isinstance(base_url, str) or not base_url:
            raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be the served model's name, got {model!r}")
        if isinstance(request_retries, bool) or not isinstance(request_retries, int) or request_retries < 0:
            raise ValueError(f"request_retries must be an int >= 0, got {request_retries!r}")
        for label, v in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff),
                         ("max_retry_after", max_retry_after)):  # fmt: skip
            bad = isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
            if bad or (label == "timeout" and v == 0):
                raise ValueError(f"{label} must be a {'positive' if label == 'timeout' else 'non-negative'} "
                                 f"number, got {v!r}")  # fmt: skip
        self._api_key = None
        if api_key_env is not None:
            self._api_key = os.environ.get(api_key_env) or None
            if self._api_key is None and api_key_env != DEFAULT_API_KEY_ENV:
                raise ValueError(f"the API key variable {api_key_env} is not set in the environment")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = float(timeout)
        self.request_retries = request_retries
        self.backoff, self.max_backoff, self.max_retry_after = (
            float(backoff),
            float(max_backoff),
            float(max_retry_after),
        )
        self.hint = hint
        self._https = url.scheme == "https"
        self._host, self._port = url.hostname, url.port
        self._path = (url.path.rstrip("/") or "") + "/chat/completions"
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._jitter = random.Random()
        self.requests = 0
        self.request_retries_by_reason: Counter[str] = Counter()
        self.request_failures: Counter[str] = Counter()

    def __repr__(self) -> str:  # no key here
        return f"ChatClient({self.base_url!r}, model={self.model!r})"

    @property
    def endpoint(self) -> str:
        """``{base_url}/chat/completions``."""
        return f"{self.base_url}/chat/completions"

    def chat(self, messages: Sequence[dict[str, Any]], **params: Any) -> str:
        """One chat completion of ``messages`` (``params``: ``max_tokens``, ``temperature``, ``seed``, ...
        added to the request body); see :meth:`complete`."""
        body = {"model": self.model, "messages": list(messages), "n": 1, "stream": False, **params}
        return self.complete(json.dumps(body).encode("utf-8"))

    def cancel(self) -> None:
        """Make every request still to come fail at once (the run is stopping)."""
        self._cancel.set()

    def close(self) -> None:
        """Close the open connections."""
        with self._lock:
            conns, self._connections = self._connections, []
        for c in conns:
            try:
                c.close()
            except Exception:  # pragma: no cover - closing a broken socket
                pass

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # pragma: no cover
                pass
            with self._lock:
                if conn in self._connections:
                    self._connections.remove(conn)

    def complete(self, body: bytes) -> str:
        """POST ``body`` (a JSON chat-completions request); the first choice's text, or a failed request
        (an empty string with ``.reason``) after the retries."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        reason = "cancelled"
        for attempt in range(self.request_retries + 1):
            if self._cancel.is_set():
                return self._failed("cancelled")
            with self._lock:
                self.requests += 1
            retry_after = None
            try:
                conn = self._connection()
                conn.request("POST", self._path, body=body, headers=headers)
                resp = conn.getresponse()
                status = resp.status
                data = resp.read()
                retry_after = _parse_retry_after(resp.getheader("Retry-After"))
                if resp.will_close:
                    self._drop_connection()
            except TimeoutError:
                self._drop_connection()
                reason = "timeout"
            except (OSError, http.client.HTTPException):
                self._drop_connection()
                reason = "connection error"
            else:
                if status == 200:
                    text = _content(data)
                    if text is not None:
                        return text
                    reason = "malformed answer"
                elif status in _FATAL_STATUS:
                    detail = data[:200].decode("utf-8", "replace")
                    raise ServerConfigError(
                        f"{self.endpoint} answered HTTP {status} for model {self.model!r} "
                        f"({self.hint}): {detail}"
                    )
                elif status in _RETRY_STATUS:
                    reason = f"HTTP {status}"
                else:
                    return self._failed(f"HTTP {status}")  # e.g. 400: the same request fails again
            if attempt == self.request_retries:
                break
            with self._lock:
                self.request_retries_by_reason[reason] += 1
                cap = min(self.max_backoff, self.backoff * 2**attempt)
                delay = self._jitter.uniform(0, cap)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.max_retry_after))
            if self._cancel.wait(delay):
                return self._failed("cancelled")
        return self._failed(reason)

    def _failed(self, reason: str) -> _RequestFailed:
        with self._lock:
            self.request_failures[reason] += 1
        return _RequestFailed(reason)


def request_failed(text: str) -> str | None:
    """Why a :meth:`ChatClient.complete` answer is a failed request, or ``None`` for an answer."""
    return text.reason if isinstance(text, _RequestFailed) else None


class ServedEngine:
    """Chains made by a model behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        base_url: the API root, e.g. ``http://localhost:8000/v1`` (``/chat/completions`` is appended).
        model: the served model's name (as the server lists it).
        types: edit types to use (default: all).
        api_key_env: the environment variable holding the API key (``None``: no key). When it is the
            default and unset, no key is sent; a name given explicitly must be set.
        concurrency: records whose chains are made at once (requests in flight).
        timeout: seconds to wait for the server (connect and each read).
        request_retries: extra tries of one request on a 429/408/5xx, a timeout, a lost connection or a
            malformed answer.
        backoff, max_backoff: the first retry waits up to ``backoff`` seconds, doubling each time, at
            most ``max_backoff`` (full jitter); a ``Retry-After`` header is honoured instead (capped at
            ``max_retry_after``).
        max_retries, max_edit_chars, max_edit_fraction: as for :class:`~rankloss.chains.LLMEngine`
            (attempts per step after the first, and the verification bounds).
        temperature, top_p: sampling settings of the retries of a step (the first attempt is greedy,
            ``temperature=0``).
        max_tokens: generation budget per request.
        send_seed: send each attempt's seed (derived from the run's seed, the record and the step), which
            vLLM, SGLang, llama.cpp and Ollama honour, so the sampling retries are reproducible.

    ``steps``, ``llm_edits``, ``fallbacks``, ``rejections``, ``requests``, ``request_retries``,
    ``request_failures`` and ``fallback_reasons`` count over every chain made (thread-safe).
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        types: Sequence[str] | str | None = None,
        api_key_env: str | None = DEFAULT_API_KEY_ENV,
        concurrency: int = 8,
        timeout: float = 60.0,
        request_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        max_retry_after: float = 120.0,
        max_retries: int = 2,
        temperature: float = 0.7,
        top_p: float = 0.95,
        max_tokens: int = 1024,
        send_seed: bool = True,
        max_edit_chars: int = 200,
        max_edit_fraction: float = 0.5,
    ) -> None:
        if not isinstance(base_url, str) or not base_url:
            raise ValueError("the openai engine needs base_url, e.g. http://localhost:8000/v1 (--base-url)")
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError("the openai engine needs the served model's name (--model NAME)")
        for label, v, lo in (("concurrency", concurrency, 1), ("request_retries", request_retries, 0),
                             ("max_tokens", max_tokens, 1)):  # fmt: skip
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{label} must be an int >= {lo}, got {v!r}")
        for label, v in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff),
                         ("max_retry_after", max_retry_after)):  # fmt: skip
            bad = isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
            if bad or (label == "timeout" and v == 0):
                raise ValueError(f"{label} must be a {'positive' if label == 'timeout' else 'non-negative'} "
                                 f"number, got {v!r}")  # fmt: skip
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
        self._client = ChatClient(
            base_url,
            model,
            api_key_env=api_key_env,
            timeout=timeout,
            request_retries=request_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            max_retry_after=max_retry_after,
        )
        self.base_url = self._client.base_url
        self.model = model
        self.concurrency = concurrency
        self.timeout = self._client.timeout
        self.request_retries = request_retries
        self.backoff, self.max_backoff, self.max_retry_after = (
            self._client.backoff,
            self._client.max_backoff,
            self._client.max_retry_after,
        )
        self.top_p = float(top_p)
        self.max_tokens = max_tokens
        self.send_seed = bool(send_seed)
        self._lock = threading.Lock()
        # Validates types, max_retries, temperature and the verification bounds like the llm engine.
        proto = LLMEngine(generate_fn=self._generate, types=types, max_retries=max_retries,
                          temperature=temperature, max_edit_chars=max_edit_chars,
                          max_edit_fraction=max_edit_fraction)  # fmt: skip
        self.types = proto.types
        self.max_retries = proto.max_retries
        self.temperature = proto.temperature
        self.max_edit_chars = proto.max_edit_chars
        self.max_edit_fraction = proto.max_edit_fraction
        self.steps = 0
        self.llm_edits = 0
        self.fallbacks = 0
        self.rejections: Counter[str] = Counter()
        self.fallback_reasons: Counter[str] = Counter()

    def __repr__(self) -> str:  # no key here
        return f"ServedEngine({self.base_url!r}, model={self.model!r}, concurrency={self.concurrency})"

    # ------------------------------------------------------------------------------------------------
    @property
    def requests(self) -> int:
        """HTTP requests sent (retries included)."""
        return self._client.requests

    @property
    def request_retries_by_reason(self) -> Counter[str]:
        """Requests sent again, by reason (429, 5xx, timeout, connection error, malformed answer)."""
        return self._client.request_retries_by_reason

    @property
    def request_failures(self) -> Counter[str]:
        """Requests that failed after their retries, by reason."""
        return self._client.request_failures

    @property
    def retries(self) -> int:
        """Requests sent again (all reasons)."""
        return sum(self.request_retries_by_reason.values())

    def make_chain(self, caption: str, length: int, *, seed: int = 0, key: str | None = None) -> Chain:
        """One chain, as :meth:`LLMEngine.make_chain`; safe to call from several threads at once."""
        reasons: Counter[str] = Counter()
        eng = _StepEngine(generate_fn=self._generate, types=self.types, max_retries=self.max_retries,
                          temperature=self.temperature, max_edit_chars=self.max_edit_chars,
                          max_edit_fraction=self.max_edit_fraction, fallback_reasons=reasons)  # fmt: skip
        chain = eng.make_chain(caption, length, seed=seed, key=key)
        with self._lock:
            self.steps += eng.steps
            self.llm_edits += eng.llm_edits
            self.fallbacks += eng.fallbacks
            self.rejections.update(eng.rejections)
            self.fallback_reasons.update(reasons)
        return chain

    def cancel(self) -> None:
        """Make every request still to come fail at once (the run is stopping)."""
        self._client.cancel()

    def close(self) -> None:
        """Close the open connections."""
        self._client.close()

    # ------------------------------------------------------------------------------------------------
    def _generate(self, prompt: str, *, seed: int, sample: bool) -> str:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature if sample else 0.0,
            "n": 1,
            "stream": False,
        }
        if sample:
            body["top_p"] = self.top_p
        if self.send_seed:
            body["seed"] = seed
        return self._client.complete(json.dumps(body).encode("utf-8"))


def _content(data: bytes) -> str | None:
    """The text of the first choice of a chat-completions answer, or ``None`` when it has none."""
    try:
        obj = json.loads(data)
        content = obj["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None
