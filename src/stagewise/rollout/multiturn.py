"""The multi-turn agent loop: generate, run the code, append the result, generate again (DeepAnalyze, Algorithm 1).

    agent = MultiTurnRollout.from_config(cfg, backend, tokenizer)       # backend: rollout.hf / vllm / vllm_server
    batch = agent.generate(prompt_ids, tasks=rows)                      # rows: the dataset rows (workspaces...)
    batch.completion_ids, batch.loss_mask, batch.texts, batch.truncated, batch.env_columns, batch.timing

One trajectory is ONE assistant message: the policy's turns and the environment's observations are concatenated
token by token after the prompt, and ``loss_mask`` says which tokens the policy wrote (1) and which the environment
inserted (0: the ``\\n<Execute>\\n…\\n</Execute>\\n`` spans, both tags included, as in SFT).

The loop, over a batch of prompts x ``n`` samples (one env per trajectory, `stagewise.envs.build_env`), runs in one
of two ways, chosen by the backend:

* **streaming** (``rollout=vllm``, ``vllm_server``: engines that batch requests as they arrive), SkyRL style: each
  trajectory is its own loop. Its turn is one request to the engine (turn 0: each prompt once with its ``n``
  samples, so the engine prefills it once), sent the moment its previous code run returned; its code runs on the
  env pool while the engine generates the other trajectories' turns. Nobody waits for the slowest program or the
  longest turn of the batch.
* **lockstep** (``rollout=hf``, a batch ``generate``): one ``generate`` call per turn over every unfinished
  trajectory, once all code runs of the turn before returned. A trajectory's code run starts the moment its turn
  stops, while the call goes on generating the others (the hf backend reports each row as it stops:
  ``generate(..., on_finished=...)``), so programs run during generation instead of after it. Which trajectories
  share a call never depends on how long a program ran, so a seeded run is reproducible (the streaming order is
  not; vLLM sampling on GPU is not bit-reproducible either). `InLockstep(backend)` runs a vLLM backend this way.

Per turn:
  1. Generation stops on token ids: the env's stop tags (``</Code>``, ``</Answer>``; single tokens, checked at
     construction) are added to the backend's own stop ids (EOS) for the batch. The stop token is kept.
  2. a turn that ends with a stop tag goes to ``env.step`` on a thread pool (``env.num_workers`` code runs at once;
     in lockstep with ``rollout=hf``, as soon as the turn stops),
     each trajectory in its own sandbox process (started ahead, while turn 0 is generated: as many as the most
     trajectories that ran code in one batch so far);
  3. the observation is tokenised (tags as their single ids, the program's text with special tokens split, so a
     printed ``<|im_end|>`` is plain text) and appended with mask 0;
  4. a trajectory ends when the env says done (``</Answer>``, or ``env.max_turns`` steps), when a turn ends with
     EOS, when a turn hits ``rollout.max_new_tokens`` without stopping, or when the context (prompt + everything
     after it) would exceed ``env.max_context_tokens``; its env is closed at once (its sandbox process freed).

``finish_reason``: ``answer`` | ``eos`` | ``max_turns`` | ``context`` | ``turn_length`` | ``env_error``. All but
the first two set ``truncated`` (the policy did not end the trajectory itself), which GRPO reports as the clipped
ratio and masks out of the loss under ``algorithm.mask_truncated``. An env whose ``step`` raises ends only its own
trajectory (``env_error``, counted as a failed code call, logged once per error type); the batch goes on. An
observation that would not fit in the context is not appended (the trajectory ends with ``context``); a generated turn that would not fit is cut at the limit.

Per-trajectory facts go to ``batch.env_columns`` (``turns``, ``code_calls``, ``code_errors``,
``code_timeouts``, ``answered``, ``finish_reason``), which GRPO passes to the rewards as columns
(``reward=deepanalyze`` reads the code-success rate from them) and logs as ``env/<name>/mean``;
``batch.timing`` (a `RolloutTiming`) has the seconds spent generating and in the env.

Where we depart from DeepAnalyze's SkyRL generator (skyrl_train/generators/skyrl_gym_generator.py in their copy,
https://github.com/ruc-datalab/DeepAnalyze):
  * Their generator re-tokenised each model turn's text; we keep the sampled token ids, so the trained tokens are
    exactly the sampled ones (no re-tokenisation drift at turn boundaries).
  * Streaming as theirs (``batched=false``, one agent loop per trajectory on an async engine) on vLLM; lockstep on
    the hf backend, which re-prefills each context every turn (no cross-turn KV cache); vLLM's prefix cache makes
    that cheap on GPU.
  * EOS ends a trajectory (theirs answered a turn without code by a "no code" error and went on, inside a message
    that had already ended). No EOS is appended to a trajectory that did not produce one.
  * ``max_new_tokens`` bounds each turn (theirs: 32768 per turn, i.e. only the context bound); set
    ``rollout.max_new_tokens`` = ``env.max_context_tokens`` for their behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import re
import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from stagewise.config import DEEPANALYZE_TAGS
from stagewise.envs import Env, Step, build_env
from stagewise.rollout.base import (RolloutBatch, RolloutTiming, SamplingParams, decode_completions,
                                     sampling_from_config)

log = logging.getLogger(__name__)

FINISH_REASONS = ("answer", "eos", "max_turns", "context", "turn_length", "env_error")
TRUNCATED_REASONS = frozenset({"max_turns", "context", "turn_length", "env_error"})
STOP_TAGS = {"code_sandbox": ("</Code>", "</Answer>")}  # env name -> the tags a turn stops at
_TAG_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in DEEPANALYZE_TAGS) + ")")


# ------------------------------------------------------------------------------------------ tokens
def single_token_id(tokenizer, tag: str) -> Optional[int]:
    """The id of ``tag`` if the tokenizer encodes it as exactly one token, else None."""
    ids = tokenizer.encode(tag, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


def encode_observations(tokenizer, texts: Sequence[str]) -> List[List[int]]:
    """Token ids of environment observations, in one tokenizer call. The DeepAnalyze tags become their single ids;
    everything else is encoded with special tokens split, so an observation cannot contain an EOS or chat marker."""
    pieces: List[str] = []
    layout: List[List[Any]] = []  # per text: tag ids (int) or indices into pieces (str placeholder)
    tag_ids = {t: single_token_id(tokenizer, t) for t in DEEPANALYZE_TAGS}
    for text in texts:
        parts: List[Any] = []
        for piece in _TAG_SPLIT.split(text):
            if not piece:
                continue
            if tag_ids.get(piece) is not None:
                parts.append(int(tag_ids[piece]))
            else:
                parts.append(str(len(pieces)))
                pieces.append(piece)
        layout.append(parts)
    encoded = tokenizer(pieces, add_special_tokens=False, split_special_tokens=True)["input_ids"] if pieces else []
    return [[tok for p in parts for tok in ([p] if isinstance(p, int) else encoded[int(p)])] for parts in layout]


# ------------------------------------------------------------------------------------------ trajectories
@dataclass
class Trajectory:
    prompt_ids: List[int]
    task: Mapping[str, Any]
    completion_ids: List[int] = field(default_factory=list)
    loss_mask: List[int] = field(default_factory=list)  # 1 = the policy's token, 0 = the environment's
    logprobs: List[float] = field(default_factory=list)  # engine log-probs of the policy's tokens, 0.0 for env's
    turns: int = 0  # generation turns
    code_calls: int = 0  # env steps that ran code (or found none to run: an error, as in DeepAnalyze)
    code_errors: int = 0
    code_timeouts: int = 0
    finish_reason: str = ""

    @property
    def done(self) -> bool:
        return bool(self.finish_reason)

    @property
    def truncated(self) -> bool:
        return self.finish_reason in TRUNCATED_REASONS

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    def append(self, ids: Sequence[int], policy: bool, logprobs: Optional[Sequence[float]] = None) -> None:
        self.completion_ids.extend(int(t) for t in ids)
        self.loss_mask.extend([1 if policy else 0] * len(ids))
        self.logprobs.extend(list(logprobs) if logprobs is not None else [0.0] * len(ids))


def task_rows(tasks: Any, num_prompts: int) -> List[Mapping[str, Any]]:
    """Dataset rows as one mapping per prompt: a batch dict of columns (``ds[rows]``), a list of rows, or None."""
    if tasks is None:
        return [{} for _ in range(num_prompts)]
    if isinstance(tasks, Mapping):
        lengths = {k: len(v) for k, v in tasks.items()}
        if any(n != num_prompts for n in lengths.values()):
            raise ValueError(f"tasks: every column needs {num_prompts} values (one per prompt), got {lengths}")
        return [{k: v[i] for k, v in tasks.items()} for i in range(num_prompts)]
    rows = list(tasks)
    if len(rows) != num_prompts:
        raise ValueError(f"tasks: {len(rows)} rows for {num_prompts} prompts")
    return rows


# ------------------------------------------------------------------------------------------ the loop
class InLockstep:
    """A streaming backend seen as a batch one: the agent loop runs its turns in lockstep, as it runs
    ``rollout=hf`` (turn batches that never depend on how long a program ran: for debugging, or to measure what
    streaming buys, ``benchmarks/multiturn_overlap.py``). Everything else goes to ``backend``."""

    def __init__(self, backend):
        object.__setattr__(self, "backend", backend)

    def __getattr__(self, name):
        if name in ("submit_turn", "step"):
            raise AttributeError(name)
        return getattr(self.backend, name)

    def __setattr__(self, name, value):  # the loop sets ``stop_ids`` on the backend it drives
        setattr(self.backend, name, value)


class MultiTurnRollout:
    """Drives a generation backend through an environment; see the module docstring. A `Generator` itself.

    ``backend`` needs ``generate(prompt_ids, SamplingParams) -> RolloutBatch`` and a ``stop_ids`` list (the token
    ids that end generation; all of stagewise's backends have one), which is extended for the duration of a call.
    """

    def __init__(self, backend, tokenizer, env_factory: Callable[[], Env], *, max_context_tokens: int,
                 stop_tags: Sequence[str] = (), num_workers: int = 8, sampling: Optional[SamplingParams] = None,
                 prewarm: Optional[Callable[[int], None]] = None):
        if not hasattr(backend, "stop_ids"):
            raise TypeError(f"{type(backend).__name__} has no `stop_ids` list: the agent loop stops turns by adding "
                            "token ids to it")
        if max_context_tokens < 1:
            raise ValueError(f"env.max_context_tokens={max_context_tokens!r} must be >= 1")
        self.backend = backend
        self.tokenizer = tokenizer
        self.env_factory = env_factory
        self.max_context_tokens = int(max_context_tokens)
        self.num_workers = max(1, int(num_workers))
        self.sampling = sampling or getattr(backend, "sampling", None) or SamplingParams()
        self.prewarm = prewarm  # called at the start of each batch with the number of sandboxes to start ahead
        self._code_trajectories: Optional[int] = None  # the most trajectories of one batch that ran code, so far
        self.tag_ids: Dict[str, int] = {}
        for tag in stop_tags:
            tid = single_token_id(tokenizer, tag)
            if tid is None:
                raise ValueError(
                    f"the agent loop stops turns at {tag}, but the tokenizer ({getattr(tokenizer, 'name_or_path', '')})"
                    f" splits it into several tokens: add the DeepAnalyze tags first (stage=vocab, or "
                    "model.tiny.with_deepanalyze_tags=true for the tiny model)")
            self.tag_ids[tag] = tid
        self.eos_ids = [int(i) for i in backend.stop_ids]
        pad = tokenizer.pad_token_id
        self.drop_ids = self.eos_ids + ([int(pad)] if pad is not None else [])
        self._pool: Optional[ThreadPoolExecutor] = None
        self._warned_no_tasks = False

    @classmethod
    def from_config(cls, cfg, backend, tokenizer) -> "MultiTurnRollout":
        """``env.*`` (name, max_turns, max_context_tokens, num_workers, sandbox limits) and ``rollout.*``."""
        env_cfg = cfg.env
        build_env(env_cfg).close()  # fail now on a bad env.name, naming the key
        prewarm = None
        if env_cfg.name == "code_sandbox":
            from stagewise.envs.code_sandbox import prewarm_sandboxes

            isolation = env_cfg.isolation
            prewarm = lambda k: prewarm_sandboxes(k, isolation)  # noqa: E731
        return cls(backend, tokenizer, lambda: build_env(env_cfg), max_context_tokens=env_cfg.max_context_tokens,
                   stop_tags=STOP_TAGS.get(env_cfg.name, ()), num_workers=env_cfg.num_workers,
                   sampling=sampling_from_config(cfg.rollout), prewarm=prewarm)

    # the backend's lifecycle, so that a stage can use this object in its place
    def sync_weights(self, policy=None) -> None:
        self.backend.sync_weights(policy)

    def staying_awake(self):
        return self.backend.staying_awake()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.backend.close()

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="env")
        return self._pool

    @contextlib.contextmanager
    def _stopping_at_tags(self):
        base = list(self.backend.stop_ids)
        self.backend.stop_ids = base + [t for t in self.tag_ids.values() if t not in base]
        try:
            yield
        finally:
            self.backend.stop_ids = base

    # ---------------------------------------------------------------------------------------- one batch
    def generate(self, prompts: Sequence[Sequence[int]], sampling: Optional[SamplingParams] = None, *,
                 tasks: Any = None) -> RolloutBatch:
        """``sampling.n`` trajectories per prompt, prompt-major; ``tasks``: the dataset rows of the prompts."""
        sampling = sampling or self.sampling
        if not prompts:
            raise ValueError("generate() got no prompts")
        if tasks is None and not self._warned_no_tasks:
            self._warned_no_tasks = True
            log.warning("multi-turn generate() called without tasks: every trajectory gets an empty workspace "
                        "(pass tasks=<the dataset rows> to run the code against the task's files)")
        rows = task_rows(tasks, len(prompts))
        n = sampling.n
        trajs = [Trajectory(prompt_ids=[int(t) for t in p], task=rows[k]) for k, p in enumerate(prompts)
                 for _ in range(n)]
        envs = [self.env_factory() for _ in trajs]
        if self.prewarm is not None:  # sandbox processes start importing while the first turn is generated
            self.prewarm(self._prewarm_count(len(trajs)))
        try:
            first = [env.reset(t.task) for env, t in zip(envs, trajs)]
            for t, ids in zip(trajs, encode_observations(self.tokenizer, first)):
                t.append(ids, policy=False)
            shared_first_turn = not any(first)
            with self._stopping_at_tags(), self.backend.staying_awake():  # one wake (and weight push) per batch
                drive = self._streaming if hasattr(self.backend, "submit_turn") else self._lockstep
                timing, with_logprobs = drive(prompts, trajs, envs, sampling, shared_first_turn)
        finally:
            list(self.pool.map(lambda env: env.close(), envs))
        self._code_trajectories = max(self._code_trajectories or 0, sum(t.code_calls > 0 for t in trajs))
        return self._batch(trajs, n, timing, with_logprobs)

    def _lockstep(self, prompts, trajs: List[Trajectory], envs: List[Env], sampling: SamplingParams,
                  shared_first_turn: bool) -> Tuple[RolloutTiming, bool]:
        """Batch backends (``rollout=hf``): one ``generate`` call per turn over every live trajectory, once every
        code run of the turn before has returned. Deterministic for a seed: which trajectories share a call never
        depends on how long a code run took."""
        generate_s, env_s, turns = 0.0, 0.0, 0
        with_logprobs = True  # engine log-probs on every turn (vLLM with TIS), else none at all
        while True:
            for t in trajs:
                if not t.done and self._budget(t) <= 0:
                    t.finish_reason = "context"
            live = [i for i, t in enumerate(trajs) if not t.done]
            if not live:
                break
            budgets = {i: self._budget(trajs[i]) for i in live}
            turn_sampling = replace(sampling, max_new_tokens=min(sampling.max_new_tokens, max(budgets.values())))
            early: Dict[int, Future] = {}  # trajectory -> its code run, started while the batch still generates

            def start_code_run(j: int, ids: List[int]) -> None:  # the backend says: row j's turn is final
                i = live[j]  # (the shared first turn's rows are the trajectories, prompt-major, as `live` is)
                if self._goes_to_env(ids, budgets[i]):
                    early[i] = self._start_step(envs[i], ids)

            report = {"on_finished": start_code_run} if getattr(self.backend, "reports_finished_rows", False) else {}
            start = time.perf_counter()
            if shared_first_turn and turns == 0 and len(live) == len(trajs):
                out = self.backend.generate([list(p) for p in prompts], turn_sampling, **report)
            else:
                out = self.backend.generate([trajs[i].prompt_ids + trajs[i].completion_ids for i in live],
                                            replace(turn_sampling, n=1), **report)
            generate_s += time.perf_counter() - start
            turns += 1
            with_logprobs = with_logprobs and out.logprobs is not None
            pending = []
            for j, i in enumerate(live):
                lp = out.logprobs[j] if out.logprobs is not None else None
                if self._take_turn(trajs[i], out.completion_ids[j], lp, budgets[i]):
                    pending.append((i, len(out.completion_ids[j])))
            start = time.perf_counter()
            self._step_envs(envs, trajs, pending, early)
            env_s += time.perf_counter() - start
        return RolloutTiming(generate_s=generate_s, env_s=env_s, turns=turns), with_logprobs

    def _streaming(self, prompts, trajs: List[Trajectory], envs: List[Env], sampling: SamplingParams,
                   shared_first_turn: bool) -> Tuple[RolloutTiming, bool]:
        """Engines that batch requests as they arrive (``rollout=vllm``, ``vllm_server``), SkyRL style: every
        trajectory is its own loop (turn -> code run -> turn). A turn goes to the engine the moment the trajectory's
        code run returns, and the code runs on the env pool while the engine generates the other trajectories'
        turns: no trajectory waits for the slowest program or the longest turn of the batch.

        The backend's ``submit_turn(context, sampling, on_done)`` queues one request (``on_done(future)`` is called
        with a finished `concurrent.futures.Future` of its `RolloutBatch`, from any thread); ``step()`` advances an
        engine that runs in this thread (colocated vLLM) and returns False when it has nothing to do (a server works
        on its own, so this loop just waits for the next finished turn or code run).

        Timing: ``generate_s`` is the time with at least one turn in flight, ``env_s`` the time generation stood
        still waiting for code, so ``generate_s + env_s`` is the rollout's wall time."""
        events: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        in_flight = {"turn": 0, "env": 0}
        with_logprobs = True  # engine log-probs on every turn, else none at all
        requests = 0

        def ask(rows: List[int], context: List[int], n: int) -> None:
            nonlocal requests
            budget = self._budget(trajs[rows[0]])
            turn = replace(sampling, n=n, max_new_tokens=min(sampling.max_new_tokens, budget))
            in_flight["turn"] += 1
            requests += 1
            self.backend.submit_turn(context, turn, lambda f: events.put(("turn", rows, budget, f)))

        def run_code(i: int, k: int) -> None:
            in_flight["env"] += 1
            self._start_step(envs[i], trajs[i].completion_ids[-k:]).add_done_callback(
                lambda f: events.put(("env", [i], None, f)))

        def next_turn_or_finish(i: int) -> None:
            t = trajs[i]
            if not t.done and self._budget(t) <= 0:
                t.finish_reason = "context"
            if t.done:
                envs[i].close()  # free its sandbox now, not at the end of the batch
            else:
                ask([i], t.prompt_ids + t.completion_ids, 1)

        def handle(kind: str, rows: List[int], budget: Optional[int], future) -> None:
            nonlocal with_logprobs
            in_flight[kind] -= 1
            if kind == "turn":
                out = future.result()  # a failed request fails the batch, as a failed generate call does
                with_logprobs = with_logprobs and out.logprobs is not None
                for j, i in enumerate(rows):
                    lp = out.logprobs[j] if out.logprobs is not None else None
                    if self._take_turn(trajs[i], out.completion_ids[j], lp, budget):
                        run_code(i, len(out.completion_ids[j]))
                    else:
                        next_turn_or_finish(i)
            else:
                i = rows[0]
                step = future.result()
                obs_ids = encode_observations(self.tokenizer, [step.observation if step is not None else ""])[0]
                self._apply_step(trajs[i], step, obs_ids)
                next_turn_or_finish(i)

        n = sampling.n
        for k, prompt in enumerate(prompts):
            rows = list(range(k * n, (k + 1) * n))
            if shared_first_turn and self._budget(trajs[rows[0]]) > 0:  # the prompt once: the engine prefills it once
                ask(rows, [int(x) for x in prompt], n)
            else:
                for i in rows:
                    next_turn_or_finish(i)
        generate_s = env_s = 0.0
        clock = time.perf_counter()
        while in_flight["turn"] or in_flight["env"]:
            generating = in_flight["turn"] > 0
            if not self.backend.step():
                handle(*events.get())
            while True:
                try:
                    event = events.get_nowait()
                except queue.Empty:
                    break
                handle(*event)
            now = time.perf_counter()
            if generating:
                generate_s += now - clock
            else:
                env_s += now - clock
            clock = now
        return RolloutTiming(generate_s=generate_s, env_s=env_s, turns=requests), with_logprobs

    def _prewarm_count(self, trajectories: int) -> int:
        """How many sandbox processes to keep started ahead: the most trajectories that ran code in one batch so far
        (each holds one for its whole episode), ``env.num_workers`` before the first batch; at least 1, at most
        ``trajectories``. The most, not the last batch's count: a count that follows the batches up and down stops
        spare processes after a batch with little code and starts them again (a second of CPU each: the data stack's
        imports) after the next, and the run's peak memory is the most one batch held anyway."""
        want = self.num_workers if self._code_trajectories is None else self._code_trajectories
        return max(1, min(trajectories, want))

    def _budget(self, t: Trajectory) -> int:
        return self.max_context_tokens - t.length

    def _goes_to_env(self, ids: Sequence[int], budget: int) -> bool:
        """Does a generated turn go to ``env.step``? When it fits the context budget and ends with a stop tag."""
        return 0 < len(ids) <= budget and int(ids[-1]) in self.tag_ids.values()

    def _start_step(self, env: Env, turn_ids: Sequence[int]) -> Future:
        """``env.step`` on the turn's text, on the env pool."""
        text = self.tokenizer.decode(list(turn_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return self.pool.submit(self._safe_step, env, text)

    def _take_turn(self, t: Trajectory, ids: Sequence[int], logprobs, budget: int) -> bool:
        """Append one generated turn; True when it goes to the env (`_goes_to_env`)."""
        ids = [int(x) for x in ids]
        to_env = self._goes_to_env(ids, budget)
        over = len(ids) > budget
        if over:
            ids = ids[:budget]
            logprobs = logprobs[:budget] if logprobs is not None else None
        t.append(ids, policy=True, logprobs=logprobs)
        t.turns += 1
        last = ids[-1] if ids else None
        if over:
            t.finish_reason = "context"
        elif to_env:
            return True
        elif last is not None and last in self.eos_ids:
            t.finish_reason = "eos"
        else:
            t.finish_reason = "context" if len(ids) >= budget else "turn_length"
        return False

    def _step_envs(self, envs, trajs, pending: List[tuple], started: Optional[Dict[int, Future]] = None) -> None:
        """Run env.step for every trajectory whose turn ended at a stop tag, in parallel (``started``: the ones
        already running, each on the same text); apply the results in trajectory order."""
        started = started or {}
        if not pending:
            return
        runs = [started.get(i) or self._start_step(envs[i], trajs[i].completion_ids[-k:]) for i, k in pending]
        steps = [run.result() for run in runs]
        obs_ids = encode_observations(self.tokenizer, [s.observation if s is not None else "" for s in steps])
        for (i, _), step, ids in zip(pending, steps, obs_ids):
            self._apply_step(trajs[i], step, ids)
        # free the sandboxes of finished trajectories now, not at the end of the batch
        finished = [envs[i] for i, _ in pending if trajs[i].done]
        list(self.pool.map(lambda env: env.close(), finished))

    def _apply_step(self, t: Trajectory, step: Optional[Step], obs_ids: List[int]) -> None:
        """Count one env step of ``t`` and append its observation (or end ``t``: env failure, answer, context)."""
        if step is None:  # the env itself failed: this trajectory ends, the others go on
            t.code_calls, t.code_errors, t.finish_reason = t.code_calls + 1, t.code_errors + 1, "env_error"
            return
        info = step.info
        if info.get("executed") or info.get("no_code"):
            t.code_calls += 1
            t.code_errors += int(bool(info.get("error")))
            t.code_timeouts += int(bool(info.get("timed_out")))
        if obs_ids and t.length + len(obs_ids) > self.max_context_tokens:
            t.finish_reason = "context"
            return
        t.append(obs_ids, policy=False)
        if step.done:
            t.finish_reason = "answer" if info.get("answered") else "max_turns"

    _env_errors_seen: set = set()

    def _safe_step(self, env: Env, text: str) -> Optional[Step]:
        try:
            return env.step(text)
        except Exception as exc:  # noqa: BLE001 - isolated to its trajectory, like a failing reward
            key = (type(exc).__name__, str(exc)[:200])
            if key not in self._env_errors_seen:
                self._env_errors_seen.add(key)
                log.warning("env.step failed; the trajectory ends with finish_reason=env_error", exc_info=True)
            return None

    def _batch(self, trajs: List[Trajectory], n: int, timing: RolloutTiming, with_logprobs: bool) -> RolloutBatch:
        completion_ids = [t.completion_ids for t in trajs]
        columns = {
            "turns": [t.turns for t in trajs],
            "code_calls": [t.code_calls for t in trajs],
            "code_errors": [t.code_errors for t in trajs],
            "code_timeouts": [t.code_timeouts for t in trajs],
            "answered": [int(t.finish_reason == "answer") for t in trajs],
            "finish_reason": [t.finish_reason for t in trajs],
        }
        return RolloutBatch(
            prompt_ids=[t.prompt_ids for t in trajs],
            completion_ids=completion_ids,
            texts=decode_completions(self.tokenizer, completion_ids, self.drop_ids),
            truncated=[t.truncated for t in trajs],
            logprobs=[t.logprobs for t in trajs] if with_logprobs else None,
            n=n,
            loss_mask=[t.loss_mask for t in trajs],
            env_columns=columns,
            timing=timing,
        )


__all__ = ["FINISH_REASONS", "InLockstep", "MultiTurnRollout", "STOP_TAGS", "Trajectory", "encode_observations",
           "single_token_id", "task_rows"]
