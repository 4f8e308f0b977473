"""The vLLM server client's request and error handling, against a real HTTP server on 127.0.0.1 that speaks the subset
of vLLM's OpenAI API the client uses (token-id prompts, ``return_tokens_as_token_ids``, LoRA hot-loading,
``/collective_rpc``) and generates with the tiny model, so that a test can script what the server answers (errors,
a plain server without the worker extension, slow turns). The client against a real ``vllm serve``:
tests/integration/test_vllm_server.py; the colocated engine: tests/integration/test_vllm_engine.py."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from omegaconf import OmegaConf

from stagewise.config import ModelConfig
from stagewise.models import load_model_and_tokenizer
from stagewise.rollout import SamplingParams
from stagewise.rollout.hf import HFRollout
from stagewise.rollout.vllm import ServerError, VLLMServerClient, parse_token_id, vllm_param_name


class JSONHandler(BaseHTTPRequestHandler):
    """Quiet request handler with a JSON ``reply``."""

    def log_message(self, *args):
        pass

    def reply(self, body, status: int = 200):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeVLLM:
    """An HTTP server with vLLM's request/response shapes; generation by the tiny model on CPU."""

    def __init__(self):
        self.model, self.tok = load_model_and_tokenizer(ModelConfig())
        self.calls: list[tuple[str, dict]] = []
        self.generated: list[list[int]] = []
        fake = self

        class Handler(JSONHandler):
            def do_GET(self):
                if self.path == "/v1/models":
                    return self.reply({"data": [{"id": "tiny"}]})
                self.reply({"error": "not found"}, 404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}")
                fake.calls.append((self.path, body))
                if self.path == "/v1/completions":
                    return self.reply(fake.complete(body))
                if self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/collective_rpc",
                                 "/reset_prefix_cache"):
                    return self.reply(None)
                self.reply({"error": "not found"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def complete(self, body: dict) -> dict:
        assert body["return_tokens_as_token_ids"] is True and body["include_stop_str_in_output"] is True
        assert body["skip_special_tokens"] is False and body["logprobs"] == 1
        sampling = SamplingParams(n=body["n"], temperature=body["temperature"], top_p=body["top_p"],
                                  max_new_tokens=body["max_tokens"], stop=tuple(body["stop"]))
        torch.manual_seed(0)
        batch = HFRollout(self.model, self.tok, sampling, return_logprobs=True).generate(body["prompt"])
        self.generated = batch.completion_ids
        choices = [{"index": i, "text": batch.texts[i], "finish_reason": "length" if batch.truncated[i] else "stop",
                    "logprobs": {"tokens": [f"token_id:{t}" for t in batch.completion_ids[i]],
                                 "token_logprobs": batch.logprobs[i]}}
                   for i in range(len(batch))]
        return {"model": body["model"], "choices": list(reversed(choices))}  # any order: the client sorts by index

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fake(tmp_path):
    server = FakeVLLM()
    yield server
    server.close()


def client_cfg(url):
    from stagewise.config import RolloutConfig

    return OmegaConf.create({"rollout": OmegaConf.structured(RolloutConfig(server_url=url)),
                             "hardware": {"deepspeed": {"zero_stage": 0}}})


def test_server_generation_is_parsed_exactly(fake, tmp_path):
    policy, tok = load_model_and_tokenizer(ModelConfig())
    client = VLLMServerClient(client_cfg(fake.url + "/v1"), policy, tok, SamplingParams(n=3, max_new_tokens=6),
                              run_dir=tmp_path)
    prompts = [tok("What is 2 + 2?")["input_ids"], tok("Hi")["input_ids"]]
    batch = client.generate(prompts)
    assert len(batch) == 6 and batch.prompt_ids == [prompts[0]] * 3 + [prompts[1]] * 3
    assert batch.completion_ids == fake.generated  # token ids come back exactly, in index order
    assert all(len(lp) == len(ids) for lp, ids in zip(batch.logprobs, batch.completion_ids))
    assert batch.truncated == [len(c) == 6 and c[-1] != tok.eos_token_id for c in batch.completion_ids]
    path, body = fake.calls[-1]
    assert path == "/v1/completions" and body["model"] == "tiny" and body["n"] == 3 and body["max_tokens"] == 6
    assert body["stop_token_ids"] == [tok.eos_token_id]


def test_full_weight_sync_names_the_missing_worker_extension(fake, tmp_path):
    """A plain server (no stagewise worker extension): the first full-weight sync fails naming the flag."""
    policy, tok = load_model_and_tokenizer(ModelConfig())
    client = VLLMServerClient(client_cfg(fake.url), policy, tok, SamplingParams(n=2), run_dir=tmp_path)
    with pytest.raises((ServerError, RuntimeError), match="--worker-extension-cls stagewise.rollout.weight_sync"):
        client.sync_weights(policy)
    assert [c[0] for c in fake.calls] == ["/collective_rpc"] and fake.calls[0][1]["method"] == "weight_sync_ping"


def test_lora_sync_hot_loads_adapters_and_generates_with_the_newest(fake, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, tok = load_model_and_tokenizer(ModelConfig())
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    client = VLLMServerClient(client_cfg(fake.url), policy, tok, SamplingParams(n=2, max_new_tokens=3),
                              run_dir=tmp_path)
    client.sync_weights(policy)
    client.sync_weights(policy)
    client.generate([tok("Hi")["input_ids"]])
    paths = [c[0] for c in fake.calls]
    assert paths == ["/v1/load_lora_adapter", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/completions"]
    assert fake.calls[0][1] == {"lora_name": "policy-1", "lora_path": str(tmp_path / "rollout_adapters" / "step_1")}
    assert fake.calls[2][1] == {"lora_name": "policy-1"}
    assert fake.calls[3][1]["model"] == "policy-2"
    assert (tmp_path / "rollout_adapters" / "step_2" / "adapter_config.json").exists()


def test_unreachable_server_fails_loudly(tmp_path):
    policy, tok = load_model_and_tokenizer(ModelConfig())
    with pytest.raises(ServerError, match=r"no vLLM server answered at http://127.0.0.1:9 within 1s"):
        VLLMServerClient(client_cfg("http://127.0.0.1:9"), policy, tok, SamplingParams(n=2), run_dir=tmp_path,
                         connect_timeout_s=1.0)


class ScriptedServer:
    """vLLM's ``/v1/completions`` on 127.0.0.1 answering with `ScriptedPolicy` turns, many requests at once (a
    thread each); records ``(prompt index, turn index)`` for every request, in arrival order."""

    def __init__(self, tok, prompts, scripts):
        from scripted_policy import ScriptedPolicy

        policy, requests, lock = ScriptedPolicy(tok, scripts), [], threading.Lock()
        close_execute = policy.close_execute
        self.requests = requests

        class Handler(JSONHandler):
            def do_GET(self):
                self.reply({"data": [{"id": "scripted"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                sampling = SamplingParams(n=body["n"], max_new_tokens=body["max_tokens"])
                with lock:
                    for context in body["prompt"]:
                        k = next(k for k, p in enumerate(prompts) if context[:len(p)] == p)
                        requests.append((k, context.count(close_execute)))
                    policy.stop_ids = body["stop_token_ids"]
                    batch = policy.generate(body["prompt"], sampling)
                self.reply({"choices": [
                    {"index": i, "finish_reason": "length" if batch.truncated[i] else "stop",
                     "logprobs": {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": [-1.0] * len(ids)}}
                    for i, ids in enumerate(batch.completion_ids)]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_server_turns_stream_so_code_runs_overlap_other_trajectories_turns(tmp_path):
    """rollout=vllm_server with env=code_sandbox: each trajectory's turn is its own request, sent the moment its code
    run returns. A trajectory whose code sleeps 1.5 s does not hold back the other one, which finishes its three
    turns (its second and third requests) before the slow one's second turn is even asked for; in lockstep the
    fast trajectory waits for the slow program at every turn. Both give the same trajectories, token for token."""
    from stagewise.config import EnvConfig
    from stagewise.envs import build_env
    from stagewise.rollout.multiturn import STOP_TAGS, InLockstep, MultiTurnRollout

    policy, tok = load_model_and_tokenizer(ModelConfig())
    prompts = [tok(f"{name} task", add_special_tokens=False)["input_ids"] for name in ("slow", "fast")]
    scripts = {(tuple(prompts[k]), 0): [f"<Code>\n{first}\n</Code>", f"<Code>\nprint('{k}b')\n</Code>",
                                        f"<Answer>Answer: {k}</Answer>"]
               for k, first in enumerate(["import time; time.sleep(1.5); print('0a')", "print('1a')"])}
    server = ScriptedServer(tok, prompts, scripts)
    env_cfg = OmegaConf.structured(EnvConfig(name="code_sandbox", max_turns=5))
    batches, requests = {}, {}
    try:
        for mode in ("streaming", "lockstep"):
            client = VLLMServerClient(client_cfg(server.url), policy, tok, SamplingParams(n=1), run_dir=tmp_path)
            backend = client if mode == "streaming" else InLockstep(client)
            agent = MultiTurnRollout(backend, tok, lambda: build_env(env_cfg), max_context_tokens=1024,
                                     stop_tags=STOP_TAGS["code_sandbox"], num_workers=2,
                                     sampling=SamplingParams(n=1, max_new_tokens=64))
            server.requests.clear()
            try:
                batches[mode] = agent.generate(prompts, tasks=[{}, {}])
            finally:
                agent.close()
            requests[mode] = list(server.requests)
    finally:
        server.close()
    streaming, lockstep = batches["streaming"], batches["lockstep"]
    assert streaming.env_columns["finish_reason"] == ["answer", "answer"] and streaming.env_columns["turns"] == [3, 3]
    assert streaming.texts[0].count("<Execute>\n0a\n") == 1 and streaming.texts[1].count("<Execute>\n1b\n") == 1
    assert streaming.completion_ids == lockstep.completion_ids and streaming.loss_mask == lockstep.loss_mask
    assert streaming.env_columns == lockstep.env_columns and streaming.logprobs == lockstep.logprobs
    order = requests["streaming"]
    assert sorted(order) == [(k, turn) for k in (0, 1) for turn in range(3)]  # 6 requests, one per turn
    assert order.index((1, 2)) < order.index((0, 1))  # fast's last turn before slow's second
    assert streaming.timing.turns == 6 and lockstep.timing.turns == 3
    assert requests["lockstep"] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]  # 3 calls, both in each


@pytest.mark.parametrize("name, expected", [
    ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", None),
    ("base_model.model.lm_head.modules_to_save.default.weight", "lm_head.weight"),
])
def test_vllm_param_names(name, expected):
    assert vllm_param_name(name) == expected


def test_parse_token_id():
    assert parse_token_id("token_id:1037") == 1037
    with pytest.raises(ServerError, match="return_tokens_as_token_ids"):
        parse_token_id("hello")
