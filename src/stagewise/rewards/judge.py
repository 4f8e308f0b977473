"""LLM-as-judge through any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, SGLang, TGI, OpenAI...).

The client is the OpenAI Python SDK (what open-r1's, verl's and OpenRLHF's judge examples use; vLLM installs it
anyway): one request per completion, ``concurrency`` of them in flight on the reward runner's threads sharing one
client (its connection pool); each request has a ``timeout_s`` and is retried ``max_retries`` times by the SDK, with
its exponential backoff and jitter, on connection errors, timeouts, HTTP 408/409/429 and 5xx (other 4xx fail at
once: a bad model name or key does not get better). The SDK's async client is not used: the runner already bounds
and overlaps the per-sample calls (``timeout_s`` per sample, errors pinned to their sample). The API key is read
from the environment variable *named* by ``api_key_env`` when the reward is built; the key itself never appears in
params, configs or logs (a server that echoes it in an error body is masked by the log redaction).
"""

from __future__ import annotations

import os
import re
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
NO_KEY = "EMPTY"  # sent when api_key_env is None: the SDK always sends a key; servers without one ignore it


class JudgeError(RuntimeError):
    pass


def render(template: str, prompt: str, completion: str, reference: str) -> str:
    """Fill ``{prompt}``, ``{completion}``, ``{reference}`` in one pass: other braces in the template stay as they
    are, and text inserted for one field is never searched for another."""
    values = {"prompt": prompt, "completion": completion, "reference": reference}
    return _FIELDS.sub(lambda m: values[m.group(1)], template)


def api_base(base_url: str) -> str:
    """The SDK's ``base_url`` (``.../v1``): a full ``.../chat/completions`` URL is accepted too."""
    return base_url.rstrip("/").removesuffix("/chat/completions")


class Judge(SampleReward):
    """Score = last number captured by ``score_regex`` in the judge's reply / ``max_score``, clamped to [0, 1].

    Params: ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``), ``model``, ``template`` (``{prompt}``,
    ``{completion}``, ``{reference}``; reference = ``answer``/``solution`` column or empty), ``system_prompt``,
    ``api_key_env`` (name of the env var holding the key; None sends the placeholder key ``EMPTY``),
    ``max_score``, ``score_regex``, ``timeout_s`` (per request), ``max_retries``, ``concurrency``, ``temperature``,
    ``max_tokens``.
    A reply with no score, or a request that still fails after the retries, raises: the sample is None and counted
    in ``rewards/judge/errors``. The runner's ``reward.timeout_s`` bounds a sample's whole time, retries included.
    """

    executor = "thread"

    def __init__(self, base_url: str, model: str, template: str = DEFAULT_TEMPLATE,
                 system_prompt: Optional[str] = None, api_key_env: Optional[str] = None, max_score: float = 10.0,
                 score_regex: str = r"SCORE:\s*([-+]?\d+(?:\.\d+)?)", timeout_s: float = 30.0, max_retries: int = 2,
                 concurrency: int = 8, temperature: float = 0.0, max_tokens: int = 512):
        from openai import OpenAI

        if api_key_env is not None and api_key_env not in os.environ:
            raise KeyError(f"judge: environment variable {api_key_env!r} (api_key_env) is not set")
        if max_score <= 0:
            raise ValueError(f"judge: max_score must be positive, got {max_score}")
        self.url = api_base(base_url) + "/chat/completions"
        self.client = OpenAI(base_url=api_base(base_url), timeout=float(timeout_s), max_retries=int(max_retries),
                             api_key=os.environ[api_key_env] if api_key_env is not None else NO_KEY)
        self.model = model
        self.template = template
        self.system_prompt = system_prompt
        self.api_key_env = api_key_env
        self.max_score = float(max_score)
        self.score_re = re.compile(score_regex)
        if self.score_re.groups < 1:
            raise ValueError(f"judge: score_regex {score_regex!r} needs a capture group for the number")
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
        import openai

        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        messages.append({"role": "user", "content": content})
        try:
            reply = self.client.chat.completions.create(model=self.model, messages=messages,
                                                        temperature=self.temperature, max_tokens=self.max_tokens)
        except openai.APIStatusError as e:  # after the SDK's retries (or at once for a 4xx it does not retry)
            raise JudgeError(f"judge {self.url} answered HTTP {e.status_code}: {e.response.text[:200]!r}") from None
        except openai.APIConnectionError as e:  # timeouts included
            raise JudgeError(f"judge {self.url} failed: {type(e).__name__}: {e}") from None
        try:
            return str(reply.choices[0].message.content)
        except (AttributeError, IndexError, TypeError) as e:
            raise JudgeError(f"judge {self.url} sent an unexpected response: {e!r}") from None
