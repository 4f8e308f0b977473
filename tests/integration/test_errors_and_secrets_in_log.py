"""Errors and secrets, through real ``train.py`` processes:
* an error in the user's setup found after start-up (here a model path that does not exist) is one line on the
  terminal, and train.log has it with its traceback;
* a judge server on 127.0.0.1 that echoes the API key in its 401 body: the key never reaches train.log, the
  terminal or metrics.jsonl (it is masked as ***), and the run goes on (the sample scores None);
* a config holding a literal ``api_key`` is refused before Hydra creates the run folder or writes .hydra/."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import run_train

SECRET = "sk-test-0123456789abcdefSECRET"


def test_fatal_error_goes_to_train_log(tmp_path):
    proc = run_train(["stage=sft", "data=tiny_sft", "model.name_or_path=/nope", "run_id=bad",
                      "logger.progress_bar=false"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "model path '/nope' does not exist" in line]
    assert errors == ["Error: model path '/nope' does not exist"]  # one line on the terminal
    assert "Traceback (most recent call last)" not in proc.stderr  # the traceback is for train.log
    log = (tmp_path / "outputs" / "train" / "bad" / "train.log").read_text()
    assert "[ERROR] - fatal error: ModelNotFoundError: model path '/nope' does not exist" in log
    assert "Traceback (most recent call last)" in log and "check_model_path" in log


class EchoKeyJudge:
    """Answers every request with HTTP 401 and a body that repeats the Authorization header (a careless server)."""

    def __init__(self):
        self.auth = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                auth = self.headers.get("Authorization", "")
                server.auth.append(auth)
                data = json.dumps({"error": f"invalid key: {auth}"}).encode()
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def echo_judge():
    server = EchoKeyJudge()
    yield server
    server.close()


@pytest.mark.slow
def test_judge_key_echoed_by_server_is_redacted(tmp_path, echo_judge):
    """Also point 4 in a real GRPO step: a user's plain function that sleeps 30 s is cut at reward.timeout_s=3, its
    samples score None, and the errors and timeouts of both rewards reach metrics.jsonl."""
    (tmp_path / "sleepy.py").write_text("import time\n\ndef sleepy(completions, **kw):\n    time.sleep(30)\n"
                                        "    return [1.0] * len(completions)\n")
    judge = (f"{{name:judge,params:{{base_url:'{echo_judge.url}',model:m,api_key_env:STAGEWISE_TEST_JUDGE_KEY,"
             "max_retries:0,timeout_s:30,concurrency:2}}")
    t0 = time.monotonic()
    proc = run_train(["stage=grpo", "algorithm=grpo", "data=tiny_grpo", "data.eval_sources=[]", "reward.timeout_s=3",
                      f"reward.functions=[{judge},{{name:format}},{{name:'{tmp_path}/sleepy.py:sleepy'}}]",
                      "rollout.n=2", "rollout.max_new_tokens=8",
                      "stage.prompts_per_step=2", "stage.max_steps=1", "stage.logging_steps=1", "run_id=judge",
                      "logger.progress_bar=false", "logger.sinks=[console,jsonl]"],
                     cwd=tmp_path, env={"STAGEWISE_TEST_JUDGE_KEY": SECRET, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert echo_judge.auth and all(a == f"Bearer {SECRET}" for a in echo_judge.auth)  # the key was really sent
    run = tmp_path / "outputs" / "train" / "judge"
    log = (run / "train.log").read_text()
    assert "answered HTTP 401" in log and "invalid key: Bearer ***" in log  # the error is there, masked
    assert SECRET not in log
    assert SECRET not in proc.stdout + proc.stderr
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".jsonl", ".yaml", ".json", ".txt"):
            assert SECRET not in path.read_text(errors="replace"), path
    step = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][0]
    assert step["rewards/judge/errors"] == 4.0 and step["reward/judge/none"] == 4.0
    assert step["rewards/judge/timeouts"] == 0.0
    assert step["rewards/sleepy/errors"] == 4.0 and step["rewards/sleepy/timeouts"] == 4.0
    assert step["reward/sleepy/none"] == 4.0 and step["rewards/format/errors"] == 0.0
    assert step["time/score"] < 25  # the 30 s sleep did not hold the step
    assert time.monotonic() - t0 < 600


def test_literal_secret_in_config_is_refused_before_anything_is_written(tmp_path):
    judge = f"{{name:judge,params:{{base_url:'http://127.0.0.1:9/v1',model:m,api_key:{SECRET}}}}}"
    proc = run_train(["stage=grpo", "data=tiny_grpo", f"reward.functions=[{judge}]", "run_id=lit"], cwd=tmp_path,
                     timeout=300)
    assert proc.returncode == 1
    assert "reward.functions[0].params.api_key" in proc.stderr and "api_key_env" in proc.stderr
    assert not (tmp_path / "outputs").exists()  # no run folder, no .hydra/config.yaml holding the key
    assert SECRET not in proc.stdout + proc.stderr


def test_a_stage_missing_what_it_needs_is_one_line_with_the_traceback_in_the_log(tmp_path):
    proc = run_train(["stage=grpo", "data=tiny_grpo", "reward=none", "run_id=noreward"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 1
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "Error: stage=grpo needs at least one reward: set reward=<preset> or reward.functions"]
    log = (tmp_path / "outputs" / "train" / "noreward" / "train.log").read_text()
    assert "ConfigValueError: stage=grpo needs at least one reward" in log and "Traceback" in log


@pytest.mark.parametrize("override, message", [
    ("data.sources=[{path: /tmp/stagewise-no-such.jsonl}]", "data source '/tmp/stagewise-no-such.jsonl' does not exist"),
    ("reward.functions=[{name: '/tmp/stagewise-no-such.py:fn'}]", "file '/tmp/stagewise-no-such.py' not found"),
])
def test_a_missing_data_or_reward_file_is_one_line_naming_it(tmp_path, override, message):
    proc = run_train(["stage=grpo", "data=tiny_grpo", "reward=tiny", override, "run_id=missing"], cwd=tmp_path,
                     timeout=300)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "[INFO]" not in line]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" in (tmp_path / "outputs" / "train" / "missing" / "train.log").read_text()
