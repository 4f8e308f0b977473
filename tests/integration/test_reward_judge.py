"""judge (on the OpenAI SDK) against a real OpenAI-compatible HTTP server on 127.0.0.1 that this test starts: canned
scores, a retry after HTTP 500, a retry after a timeout, no retry on 401, the API key from a named env var,
concurrency."""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stagewise.config import RewardConfig, RewardFnConfig
from stagewise.rewards import RewardRunner, build

TEMPLATE = "Q={prompt}|A={completion}|R={reference}"


class JudgeServer:
    """Replies by the completion embedded in the prompt: ``score:N`` -> "SCORE: N"; ``flaky`` -> 500 on the first
    try; ``slow-once`` -> sleeps past the client timeout on the first try; ``always-slow``; ``down`` -> always 500;
    ``forbidden`` -> 401; ``chatty`` -> no score; ``multi`` -> two scores; ``nap`` -> sleeps 0.3 s then SCORE: 5;
    anything else -> SCORE: 0."""

    def __init__(self):
        self.requests = []
        self.attempts = {}
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                answer = content.split("|A=")[1].split("|R=")[0]
                with server.lock:
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                            "body": body})
                    server.attempts[answer] = attempt = server.attempts.get(answer, 0) + 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self.reply(answer, attempt)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def reply(self, answer, attempt):
                if answer == "down" or (answer == "flaky" and attempt == 1):
                    return self.send_json(500, {"error": "overloaded"})
                if answer == "forbidden":
                    return self.send_json(401, {"error": "bad key"})
                if answer == "always-slow" or (answer == "slow-once" and attempt == 1):
                    time.sleep(1.0)
                text = {"flaky": "fine now. SCORE: 6", "slow-once": "SCORE: 7", "always-slow": "SCORE: 1",
                        "chatty": "I would rather not grade this.", "multi": "first SCORE: 3, final SCORE: 9",
                        "nap": "SCORE: 5"}.get(answer)
                if answer == "nap":
                    time.sleep(0.3)
                if text is None:
                    text = f"Looks right. SCORE: {answer.split(':')[1]}" if answer.startswith("score:") else "SCORE: 0"
                self.send_json(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

            def send_json(self, code, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test-123")
    s = JudgeServer()
    yield s
    s.close()


def judge(server, **params):
    base = dict(base_url=server.url, model="judge-model", template=TEMPLATE, api_key_env="JUDGE_TEST_KEY",
                timeout_s=0.4, max_retries=1, concurrency=4)
    return build("judge", **{**base, **params})


def test_scores_retries_and_failures(server, caplog):
    completions = ["score:8", "score:2", "score:15", "flaky", "slow-once", "multi", "chatty", "down", "always-slow",
                   "forbidden"]
    with caplog.at_level(logging.WARNING, logger="stagewise.rewards"):
        out = judge(server)(completions, prompt=["What is 2+2?"] * len(completions), answer=["4"] * len(completions))
    assert out == [0.8, 0.2, 1.0, 0.6, 0.7, 0.9, None, None, None, None]
    assert server.attempts == {"score:8": 1, "score:2": 1, "score:15": 1, "flaky": 2, "slow-once": 2, "multi": 1,
                               "chatty": 1, "down": 2, "always-slow": 2, "forbidden": 1}  # no retry on 401
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "judge reply has no score" in messages and "HTTP 401" in messages and "HTTP 500" in messages
    assert "sk-test-123" not in messages


def test_request_shape_and_key(server):
    out = judge(server, system_prompt="You are strict.", max_score=5, temperature=0.5, max_tokens=32)(
        ["score:4"], prompt=[[{"role": "user", "content": "Capital of France?"}]], solution=["Paris"])
    assert out == [0.8]  # 4 / max_score 5
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer sk-test-123"
    assert request["body"] == {
        "model": "judge-model", "temperature": 0.5, "max_tokens": 32,
        "messages": [{"role": "system", "content": "You are strict."},
                     {"role": "user", "content": "Q=Capital of France?|A=score:4|R=Paris"}]}


def test_no_key_env_means_a_placeholder_key_and_missing_env_is_an_error(server, monkeypatch):
    assert judge(server, api_key_env=None)(["score:10"]) == [1.0]
    assert server.requests[0]["auth"] == "Bearer EMPTY"  # the SDK always sends one; keyless servers ignore it
    assert server.requests[0]["body"]["messages"][0]["content"] == "Q=|A=score:10|R="
    monkeypatch.delenv("JUDGE_TEST_KEY")
    with pytest.raises(KeyError, match="'JUDGE_TEST_KEY'"):
        judge(server)


def test_concurrency(server):
    start = time.monotonic()
    assert judge(server, concurrency=4)(["nap"] * 4) == [0.5] * 4
    assert server.max_in_flight >= 2  # requests overlapped (4 threads; 2 shared cores make 4 not guaranteed)
    assert time.monotonic() - start < 4 * 0.3 + 1.0


def test_judge_in_the_runner(server):
    cfg = RewardConfig(functions=[
        RewardFnConfig(name="judge", weight=0.5, params=dict(base_url=server.url, model="m", template=TEMPLATE,
                                                             timeout_s=0.4, max_retries=1)),
        RewardFnConfig(name="format", weight=1.0)])
    with RewardRunner(cfg) as runner:
        res = runner(["score:10", "chatty", "down", "<think>a</think><answer>b</answer>"], prompt=["p"] * 4)
    assert res.per_fn["judge"] == [1.0, None, None, 0.0]
    assert res.metrics["rewards/judge/errors"] == 2.0  # no score in the reply; HTTP 500 after the retry
    assert res.total == [0.5, 0.0, 0.0, 1.0]
