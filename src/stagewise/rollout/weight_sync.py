"""Full weights to a ``vllm serve`` server over a process group (NCCL on GPU, gloo on CPU), not through disk.

The trainer (rank 0 of the weight group) and every worker of the server (ranks 1..W) form a small process group of
their own, rendezvousing at a TCP store the trainer hosts; the trainer's usual process group is not involved. Each
step the trainer broadcasts the policy's weights in buckets of at most ``bucket_bytes`` (one flat byte buffer per
bucket, many parameters each: a few large collectives instead of one per parameter), and the workers load each
bucket into the engine with the model's own ``load_weights`` inside vLLM's layerwise reload (begun before the first
bucket, finalized after the last: what vLLM's own weight-transfer engines do, docs.vllm.ai "training/layerwise").
TRL (``vllm-serve`` + ``update_named_param``) and OpenRLHF (``broadcast_to_vllm``) broadcast one parameter at a
time into a plain ``load_weights``, which fails on vLLM's CPU backend (it repacks each linear layer's weight for its
GEMM after loading, so the checkpoint-format parameter is gone).

Server side: this module's `WeightReceiver` is a vLLM worker extension, and the trainer calls it through vLLM's
``/collective_rpc`` route (development mode)::

    VLLM_SERVER_DEV_MODE=1 vllm serve <model> --worker-extension-cls stagewise.rollout.weight_sync.WeightReceiver

(with vLLM's CPU build, ``python -m vllm.entrypoints.openai.api_server --model <model> ...``: its ``vllm`` command
looks for a package named ``vllm`` and fails)

(stagewise must be importable on the server). Every call's arguments are one JSON string, as ``/collective_rpc``
passes only strings. A collective blocks until both sides take part, so the trainer posts each call from a thread
and joins the broadcast meanwhile; the call returns when every worker has loaded the bucket.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from datetime import timedelta
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger(__name__)

BUCKET_BYTES = 256 * 2**20
GROUP_TIMEOUT_S = 300.0


def process_group(host: str, port: int, world_size: int, rank: int, backend: str):
    """A process group of ``world_size`` members that rendezvous at ``host:port`` (rank 0 hosts the store),
    independent of ``torch.distributed``'s default group."""
    import torch.distributed as dist

    store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size)
    raise ValueError(f"weight sync backend must be nccl or gloo, got {backend!r}")


def broadcast_from_trainer(group, buffer: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([buffer], opts).wait()


def buckets(weights: Iterable[Tuple[str, torch.Tensor]], bucket_bytes: int
            ) -> Iterable[List[Tuple[str, torch.Tensor]]]:
    """Consecutive ``(name, tensor)`` runs of at most ``bucket_bytes`` (a larger tensor goes alone)."""
    bucket: List[Tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in weights:
        n = tensor.numel() * tensor.element_size()
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += n
    if bucket:
        yield bucket


def pack_bucket(bucket: Sequence[Tuple[str, torch.Tensor]], device) -> Tuple[torch.Tensor, List[Dict[str, Any]]]:
    """Tensors -> one flat ``uint8`` buffer on ``device`` (each tensor copied into it once) and the manifest the
    receiver unpacks it with."""
    manifest, offset = [], 0
    for name, tensor in bucket:
        nbytes = tensor.numel() * tensor.element_size()
        manifest.append({"name": name, "dtype": str(tensor.dtype).removeprefix("torch."),
                         "shape": list(tensor.shape), "offset": offset, "nbytes": nbytes})
        offset += nbytes
    buffer = torch.empty(offset, dtype=torch.uint8, device=device)
    for (_, tensor), m in zip(bucket, manifest):
        buffer[m["offset"]:m["offset"] + m["nbytes"]].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
    return buffer, manifest


def unpack_bucket(buffer: torch.Tensor, manifest: Sequence[Dict[str, Any]]) -> List[Tuple[str, torch.Tensor]]:
    """The inverse of `pack_bucket`: views into ``buffer``, no copy."""
    return [(m["name"], buffer[m["offset"]:m["offset"] + m["nbytes"]].view(getattr(torch, m["dtype"]))
             .view(m["shape"])) for m in manifest]


class WeightReceiver:
    """vLLM worker extension (``--worker-extension-cls``): the server side of the weight group. vLLM mixes these
    methods into each worker, where ``self.rank`` is the worker's rank in the engine and
    ``self.model_runner.model`` its model."""

    weight_group = None

    def weight_sync_ping(self) -> str:
        """Answers once per worker: the trainer counts the workers with it."""
        return "stagewise-weight-receiver"

    def weight_sync_init(self, args: str) -> str:
        a = json.loads(args)
        self.weight_group = process_group(a["host"], a["port"], a["world_size"], 1 + int(self.rank), a["backend"])
        self.weight_group_device = torch.device(a["device"]) if a["device"] == "cpu" else torch.device(
            "cuda", torch.cuda.current_device())
        return "ok"

    def weight_sync_begin(self) -> str:
        """Start one push: vLLM's layerwise reload (the supported way to load new weights into a model whose
        layers were already processed for their kernels, e.g. the CPU backend's repacked GEMM weights)."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with self._vllm_config():
            initialize_layerwise_reload(self.model_runner.model)
        return "ok"

    def weight_sync_receive(self, args: str) -> int:
        if self.weight_group is None:
            raise RuntimeError("weight_sync_receive before weight_sync_init")
        manifest = json.loads(args)
        total = sum(m["nbytes"] for m in manifest)
        buffer = torch.empty(total, dtype=torch.uint8, device=self.weight_group_device)
        broadcast_from_trainer(self.weight_group, buffer)
        with self._vllm_config():  # each layer is processed as soon as all of its tensors have arrived
            self.model_runner.model.load_weights(weights=unpack_bucket(buffer, manifest))
        return len(manifest)

    def weight_sync_end(self) -> str:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with self._vllm_config():
            finalize_layerwise_reload(self.model_runner.model, self.vllm_config.model_config)
        return "ok"

    def _vllm_config(self):
        from vllm.config import set_current_vllm_config

        return set_current_vllm_config(self.vllm_config)


class WeightSender:
    """The trainer side (main process only): joins the weight group with every worker of the server at ``base``,
    then `send` broadcasts weights bucket by bucket. ``rpc(method, args)`` posts to the server's
    ``/collective_rpc`` and returns the per-worker results."""

    def __init__(self, rpc: Callable[[str, List[str]], list], *, host: str, backend: str,
                 bucket_bytes: Optional[int] = None, port: Optional[int] = None):
        self.rpc, self.bucket_bytes = rpc, bucket_bytes or BUCKET_BYTES
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        workers = rpc("weight_sync_ping", [])
        if not workers or any(w != "stagewise-weight-receiver" for w in workers):
            raise RuntimeError(f"the vLLM server's workers answered {workers!r} to weight_sync_ping; start it with "
                               f"--worker-extension-cls stagewise.rollout.weight_sync.WeightReceiver")
        port = port or free_port(host)
        args = json.dumps({"host": host, "port": port, "world_size": 1 + len(workers), "backend": backend,
                           "device": self.device.type})
        joined = _in_thread(lambda: rpc("weight_sync_init", [args]))
        self.group = process_group(host, port, 1 + len(workers), 0, backend)
        joined()
        self.workers = len(workers)
        self.broadcasts = 0
        log.info("weight sync: %s group with %d vLLM worker(s) at %s:%d", backend, self.workers, host, port)

    def send(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        self.rpc("weight_sync_begin", [])
        for bucket in buckets(weights, self.bucket_bytes):
            buffer, manifest = pack_bucket(bucket, self.device)
            loaded = _in_thread(lambda m=manifest: self.rpc("weight_sync_receive", [json.dumps(m)]))
            broadcast_from_trainer(self.group, buffer)
            self.broadcasts += 1
            counts = loaded()  # vLLM's route answers non-JSON results as strings
            if any(int(c) != len(manifest) for c in counts):
                raise RuntimeError(f"a vLLM worker loaded {counts} of {len(manifest)} tensors")
        self.rpc("weight_sync_end", [])


def drain(weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Non-main ranks under ZeRO-3: take part in the per-parameter gathers `iter_policy_weights` runs."""
    for _ in weights:
        pass


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Start ``fn`` in a thread; the returned function joins it and returns its result or raises its error."""
    box: Dict[str, Any] = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join():
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["result"]

    return join
