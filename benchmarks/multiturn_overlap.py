"""Multi-turn rollout wall time: turns streamed one request each (vLLM backends) vs lockstep turns (rollout=hf).

    python benchmarks/multiturn_overlap.py                        # 16 trajectories, 3 code turns + an answer each
    python benchmarks/multiturn_overlap.py --slow-code 4 --ms-per-token 20

What runs: the real `MultiTurnRollout` with the real `VLLMServerClient` over HTTP, the real code sandbox
(``env=code_sandbox``: every ``<Code>`` block runs in its own sandbox process). The model is simulated: a
scripted server on 127.0.0.1 with vLLM's ``/v1/completions`` shapes answers each trajectory's turns from a script
and takes ``--ms-per-token`` per generated token for each request, whatever else is in flight (decode steps whose
time does not grow with the batch: the memory-bound regime of a GPU engine with a few dozen sequences). The code
of turn ``k`` of trajectory ``i`` sleeps ``--slow-code`` seconds when ``(3 i + k) % 7 == 0`` and ``--fast-code``
otherwise (a long tail: a few programs read a large file or train a model), then prints.

Both modes produce the same trajectories (checked). Lockstep runs each turn as one call over every live
trajectory and then waits for all of their programs, so every turn costs the slowest program of the batch;
streaming sends a trajectory's next turn when its own program returns, so the programs overlap the others'
generation. The gain is what scheduling alone buys: a real engine's per-token time grows with its batch, which
this server does not model.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from omegaconf import OmegaConf

from stagewise.config import EnvConfig, ModelConfig, RolloutConfig
from stagewise.envs import build_env
from stagewise.models import load_model_and_tokenizer
from stagewise.rollout import SamplingParams
from stagewise.rollout.multiturn import STOP_TAGS, InLockstep, MultiTurnRollout
from stagewise.rollout.vllm import VLLMServerClient


def turn_text(i: int, k: int, code_turns: int, slow: float, fast: float) -> str:
    if k == code_turns:
        return f"<Answer>Answer: {i}</Answer>"
    seconds = slow if (3 * i + k) % 7 == 0 else fast
    return f"<Code>\nimport time\ntime.sleep({seconds})\nprint({i * 10 + k})\n</Code>"


def scripted_server(tok, code_turns: int, slow: float, fast: float, s_per_token: float) -> ThreadingHTTPServer:
    """vLLM's completions API answering trajectory ``i`` (named in its prompt) with turn ``k`` (the number of
    ``</Execute>`` ids in its context), one thread per request, ``s_per_token`` per generated token."""
    close_execute = tok.convert_tokens_to_ids("</Execute>")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.reply({"data": [{"id": "scripted"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            choices = []
            for context in body["prompt"]:
                i = int(re.search(r"task (\d+)", tok.decode(context)).group(1))
                text = turn_text(i, context.count(close_execute), code_turns, slow, fast)
                ids = tok(text, add_special_tokens=False)["input_ids"]
                for _ in range(body["n"]):
                    choices.append({"index": len(choices), "finish_reason": "stop",
                                    "logprobs": {"tokens": [f"token_id:{t}" for t in ids],
                                                 "token_logprobs": [-1.0] * len(ids)}})
            time.sleep(s_per_token * max(len(c["logprobs"]["tokens"]) for c in choices))
            self.reply({"choices": choices})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trajectories", type=int, default=16)
    p.add_argument("--code-turns", type=int, default=3)
    p.add_argument("--slow-code", type=float, default=2.0, help="seconds of the long-tail programs")
    p.add_argument("--fast-code", type=float, default=0.05, help="seconds of the others")
    p.add_argument("--ms-per-token", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    policy, tok = load_model_and_tokenizer(ModelConfig())
    server = scripted_server(tok, a.code_turns, a.slow_code, a.fast_code, a.ms_per_token / 1000)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    cfg = OmegaConf.create({"rollout": OmegaConf.structured(RolloutConfig(server_url=url)),
                            "hardware": {"deepspeed": {"zero_stage": 0}}})
    env_cfg = OmegaConf.structured(EnvConfig(name="code_sandbox", max_turns=a.code_turns + 2,
                                             num_workers=a.trajectories))
    prompts = [tok(f"task {i}", add_special_tokens=False)["input_ids"] for i in range(a.trajectories)]
    results, batches = {}, {}
    try:
        for repeat in range(a.repeats + 1):  # the first round warms the sandbox processes up and is not timed
            for mode in ("lockstep", "streaming"):
                client = VLLMServerClient(cfg, policy, tok, SamplingParams(n=1))
                agent = MultiTurnRollout(client if mode == "streaming" else InLockstep(client), tok,
                                         lambda: build_env(env_cfg), max_context_tokens=2048,
                                         stop_tags=STOP_TAGS["code_sandbox"], num_workers=a.trajectories,
                                         sampling=SamplingParams(n=1, max_new_tokens=128))
                t0 = time.perf_counter()
                try:
                    batch = agent.generate(prompts, tasks=[{} for _ in prompts])
                finally:
                    agent.close()
                if repeat:
                    results.setdefault(mode, []).append((time.perf_counter() - t0, batch.timing))
                batches[mode] = batch
    finally:
        server.shutdown()
    same = batches["lockstep"].completion_ids == batches["streaming"].completion_ids and \
        batches["lockstep"].env_columns == batches["streaming"].env_columns
    assert same, "the two modes produced different trajectories"
    assert set(batches["streaming"].env_columns["finish_reason"]) == {"answer"}

    slow = sum((3 * i + k) % 7 == 0 for i in range(a.trajectories) for k in range(a.code_turns))
    print(f"{a.trajectories} trajectories x {a.code_turns} code turns + an answer; {slow} of "
          f"{a.trajectories * a.code_turns} programs take {a.slow_code}s, the rest {a.fast_code}s; "
          f"{a.ms_per_token} ms per generated token; median of {a.repeats}; trajectories identical in both modes\n")
    print("| mode | wall s | generating s | waiting for code s | lockstep / this |")
    print("|---|---|---|---|---|")
    base = sorted(t for t, _ in results["lockstep"])[len(results["lockstep"]) // 2]
    for mode in ("lockstep", "streaming"):
        runs = sorted(results[mode], key=lambda r: r[0])
        wall, timing = runs[len(runs) // 2]
        print(f"| {mode} | {wall:.2f} | {timing.generate_s:.2f} | {timing.env_s:.2f} | {base / wall:.2f}x |")


if __name__ == "__main__":
    main()
