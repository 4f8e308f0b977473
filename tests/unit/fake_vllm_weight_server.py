"""A stand-in for ``VLLM_SERVER_DEV_MODE=1 vllm serve --worker-extension-cls
stagewise.rollout.weight_sync.WeightReceiver``, run as its own process by tests/unit/test_grpo_vllm.py: vLLM's
``/v1/models``, ``/collective_rpc`` (the method called on one worker of rank 0, results answered as vLLM does:
``{"results": [...]}``, non-JSON values as strings) and ``/reset_prefix_cache``, plus ``/weights``, a sha256 per
parameter of the worker's model, for the test to compare. The worker's model is the tiny model with a vLLM-style
``load_weights``. Prints the port it listens on."""

from __future__ import annotations

import hashlib
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from stagewise.config import ModelConfig
from stagewise.models import load_model_and_tokenizer
from stagewise.rollout.weight_sync import WeightReceiver


class TinyEngineModel:
    def __init__(self):
        self.model, _ = load_model_and_tokenizer(ModelConfig())
        self.params = dict(self.model.named_parameters())
        self.loaded = 0

    def load_weights(self, weights):
        with torch.no_grad():
            for name, tensor in weights:
                self.params[name].copy_(tensor)
                self.loaded += 1


class Worker(WeightReceiver):
    rank = 0

    def __init__(self):
        self.model_runner = type("Runner", (), {})()
        self.model_runner.model = TinyEngineModel()


class JSONHandler(BaseHTTPRequestHandler):
    """Quiet request handler with a JSON ``reply`` (also the base of test_grpo_vllm.FakeVLLM's handler)."""

    def log_message(self, *args):
        pass

    def reply(self, body, status: int = 200):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def main() -> None:
    worker = Worker()

    class Handler(JSONHandler):
        def do_GET(self):
            if self.path == "/v1/models":
                return self.reply({"data": [{"id": "tiny"}]})
            if self.path == "/weights":
                model = worker.model_runner.model
                return self.reply({"loaded": model.loaded,
                                   "sha256": {n: digest(p) for n, p in model.params.items()}})
            self.reply({"error": "not found"}, 404)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}")
            if self.path == "/collective_rpc":
                result = getattr(worker, body["method"])(*body.get("args", []))
                return self.reply({"results": [result if isinstance(result, (dict, list)) else str(result)]})
            if self.path == "/reset_prefix_cache":
                return self.reply(None)
            self.reply({"error": "not found"}, 404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
