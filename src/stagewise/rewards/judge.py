"""LLM-as-judge through any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, SGLang, TGI, OpenAI...).

Standard library HTTP only (urllib), so nothing extra to install. One request per completion, ``concurrency`` of
them in flight on a thread pool; each request has a socket ``timeout_s`` and is retried ``max_retries`` times with
exponential backoff on connection errors, timeouts, HTTP 429 and 5xx (other 4xx fail at once: a bad model name or
key does not get better). The API key is read at request time from the environment variable *named* by
``api_key_env``; the key itself never appears in params, configs or logs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from typing import Optional

from stagewise.rewards.base import GOLD_COLUMNS, Row, SampleReward, gold_texts, is_missing, prompt_text

DEFAULT_TEMPLATE = """You are grading an assistant's reply to a user.

[Question]
{prompt}

[Reference answer (may be empty)]
{reference}

[Assistant's reply]
{completion}

Rate the reply from 0 (useless or wrong) to 10 (correct, helpful and safe). Explain briefly, then end with a line \
of the form "SCORE: <number>"."""

_FIELDS = re.compile(r"\{(prompt|completion|reference)\}")
_RETRY_STATUS = {408, 409, 425, 429}


class JudgeError(RuntimeError):
    pass


def render(template: str, prompt: str, completion: str, reference: str) -> str:
    """Fill ``{prompt}``, ``{completion}``, ``{reference}`` in one pass: other braces in the template stay as they
    are, and text inserted for one field is never searched for another."""
    values = {"prompt": prompt, "completion": completion, "reference": reference}
    return _FIELDS.sub(lambda m: values[m.group(1)], template)


def endpoint(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class Judge(SampleReward):
    """Score = last number captured by ``score_regex`` in the judge's reply / ``max_score``, clamped to [0, 1].

    Params: ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``), ``model``, ``template`` (``{prompt}``,
    ``{completion}``, ``{reference}``; reference = ``answer``/``solution`` column or empty), ``system_prompt``,
    ``api_key_env`` (name of the env var holding the key; None sends no Authorization header), ``max_score``,
    ``score_regex``, ``timeout_s`` (per request), ``max_retries``, ``backoff_s`` (first retry delay, doubled each
    time), ``concurrency``, ``temperature``, ``max_tokens``.
    A reply with no score, or a request that still fails after the retries, raises: the sample is None and counted
    in ``rewards/judge/errors``. The longest a sample can take is about
    ``(max_retries + 1) * timeout_s + backoff_s * (2**max_retries - 1)``.
    """

    executor = "thread"

    def __init__(self, base_url: str, model: str, template: str = DEFAULT_TEMPLATE,
                 system_prompt: Optional[str] = None, api_key_env: Optional[str] = None, max_score: float = 10.0,
                 score_regex: str = r"SCORE:\s*([-+]?\d+(?:\.\d+)?)", timeout_s: float = 30.0, max_retries: int = 2,
                 backoff_s: float = 0.5, concurrency: int = 8, temperature: float = 0.0, max_tokens: int = 512):
        if api_key_env is not None and api_key_env not in os.environ:
            raise KeyError(f"judge: environment variable {api_key_env!r} (api_key_env) is not set")
        if max_score <= 0:
            raise ValueError(f"judge: max_score must be positive, got {max_score}")
        self.url = endpoint(base_url)
        self.model = model
        self.template = template
        self.system_prompt = system_prompt
        self.api_key_env = api_key_env
        self.max_score = float(max_score)
        self.score_re = re.compile(score_regex)
        if self.score_re.groups < 1:
            raise ValueError(f"judge: score_regex {score_regex!r} needs a capture group for the number")
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.concurrency = int(concurrency)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)

    def per_sample(self, completion: str, row: Row) -> float:
        reference = next((gold_texts(row[k]) for k in GOLD_COLUMNS if k in row and not is_missing(row[k])), [])
        content = render(self.template, prompt_text(row.get("prompt")), completion, "\n".join(reference))
        reply = self.chat(content)
        scores = self.score_re.findall(reply)
        if not scores:
            raise JudgeError(f"judge reply has no score matching {self.score_re.pattern!r}: {reply[:200]!r}")
        value = scores[-1][0] if isinstance(scores[-1], tuple) else scores[-1]
        return min(1.0, max(0.0, float(value) / self.max_score))

    def chat(self, content: str) -> str:
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        messages.append({"role": "user", "content": content})
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key_env is not None:
            headers["Authorization"] = f"Bearer {os.environ.get(self.api_key_env, '')}"
        last_error: Exception = JudgeError("no attempt made")
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read().decode())
                return str(payload["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code not in _RETRY_STATUS:
                    raise JudgeError(f"judge {self.url} answered HTTP {e.code}: {e.read()[:200]!r}") from e
                last_error = JudgeError(f"judge {self.url} answered HTTP {e.code}")
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last_error = JudgeError(f"judge {self.url} failed: {type(e).__name__}: {e}")
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise JudgeError(f"judge {self.url} sent an unexpected response: {e!r}") from e
        raise last_error
