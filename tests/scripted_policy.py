"""Scripted generation backends for the multi-turn loop's tests: fixed token ids for each trajectory's next turn, cut
at the stop ids the loop asks for, as a real backend does. `ScriptedPolicy` is a batch backend (the loop runs it in
lockstep); `StreamingScriptedPolicy` takes each turn as its own request on a thread, as a vLLM server does (the loop
streams); `ReportingScriptedPolicy` is a batch backend that, like ``rollout=hf``, reports each row the moment it
stops (the loop starts its code run while the call goes on)."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from stagewise.rollout import RolloutBatch
from stagewise.rollout.multiturn import single_token_id


class ScriptedPolicy:
    """A generation backend with scripted turns. ``scripts[(prompt_ids, k)]`` is the list of turn texts of the k-th
    sample of a prompt; a later turn's context is matched back to its script by its first turn, and its turn index
    is the number of ``</Execute>`` ids in it. Like a real backend it stops at the first id in ``stop_ids``
    (keeping it) and at ``max_new_tokens`` (truncated)."""

    def __init__(self, tok, scripts):
        self.tok, self.stop_ids, self.calls = tok, [tok.eos_token_id], []
        self.scripts = {key: [tok.encode(t, add_special_tokens=False) for t in turns] for key, turns in scripts.items()}
        self.close_execute = single_token_id(tok, "</Execute>")

    def turn_ids(self, context, k=0):
        best, best_len = None, 0
        for (prompt, j), turns in self.scripts.items():
            p = list(prompt)
            if context[:len(p)] != p:
                continue
            done = context[len(p):]
            if not done and j == k:  # a first turn: the k-th sample of this prompt
                return turns[0]
            common = next((i for i, (a, b) in enumerate(zip(done, turns[0])) if a != b), min(len(done), len(turns[0])))
            if done and common > best_len:  # the script whose first turn this trajectory started with
                best, best_len = turns[done.count(self.close_execute)], common
        assert best is not None, "no script for this context"
        return best

    def generate(self, prompts, sampling):
        self.calls.append({"prompts": len(prompts), "n": sampling.n, "stop_ids": list(self.stop_ids),
                           "max_new_tokens": sampling.max_new_tokens})
        out, truncated = [], []
        for p in prompts:
            for k in range(sampling.n):
                ids = self.turn_ids(list(p), k)
                stop = next((i + 1 for i, t in enumerate(ids) if t in self.stop_ids), None)
                cut = min(stop or len(ids), sampling.max_new_tokens)
                out.append(ids[:cut])
                truncated.append(stop is None or stop > sampling.max_new_tokens)
        return RolloutBatch(prompt_ids=[list(p) for p in prompts for _ in range(sampling.n)], completion_ids=out,
                            texts=[self.tok.decode(c) for c in out], truncated=truncated, n=sampling.n)

    def sync_weights(self, *args):
        pass

    def staying_awake(self):
        return contextlib.nullcontext()

    def close(self):
        pass


class ReportingScriptedPolicy(ScriptedPolicy):
    """`ScriptedPolicy` with ``rollout=hf``'s ``on_finished``: during a call, each row that stopped is reported with
    its final ids, shortest first (the order a token-by-token generator finishes them in); the call then lingers for
    ``linger_s`` and records in ``returned_at`` when it returned."""

    reports_finished_rows = True

    def __init__(self, tok, scripts, linger_s: float = 0.0):
        super().__init__(tok, scripts)
        self.linger_s, self.returned_at = linger_s, []

    def generate(self, prompts, sampling, on_finished=None):
        batch = super().generate(prompts, sampling)
        if on_finished is not None:
            for j in sorted(range(len(batch)), key=lambda j: len(batch.completion_ids[j])):
                if not batch.truncated[j]:
                    on_finished(j, list(batch.completion_ids[j]))
        time.sleep(self.linger_s)
        self.returned_at.append(time.monotonic())
        return batch


class StreamingScriptedPolicy(ScriptedPolicy):
    """`ScriptedPolicy` taking turns one request at a time (``submit_turn``), each answered on its own thread."""

    def __init__(self, tok, scripts):
        super().__init__(tok, scripts)
        self.pool = ThreadPoolExecutor(max_workers=16)
        self.lock = threading.Lock()

    def generate(self, prompts, sampling):
        with self.lock:  # calls is appended from several threads
            return super().generate(prompts, sampling)

    def submit_turn(self, context, sampling, on_done):
        self.pool.submit(self.generate, [context], sampling).add_done_callback(on_done)

    def step(self):
        return False

    def close(self):
        self.pool.shutdown(wait=True)


def chained_policy(tok, chains):
    """The default tiny model rewired so that its next token depends on its current token only, and follows the
    given chains with probability ~1 (logit gap ~28 nats): each chain is a list of texts; its first text's last
    token is followed by the next texts' tokens in order. For a real engine (vLLM) whose output a test must script:
    every transformer block adds nothing (``o_proj`` and ``down_proj`` are zero), so the last hidden state is the
    token's own embedding, a one-hot on a dimension of its own, and the LM head maps that dimension to the
    successor's row. Tokens outside the chains have a zero embedding and a uniform next token."""
    import torch

    from stagewise.config import ModelConfig
    from stagewise.models import load_model_and_tokenizer

    successors = {}
    for chain in chains:
        ids = [tok.encode(text, add_special_tokens=False) for text in chain]
        flat = [ids[0][-1]] + [t for part in ids[1:] for t in part]
        for a, b in zip(flat, flat[1:]):
            assert successors.setdefault(a, b) == b, f"token {tok.decode([a])!r} would have two successors"
    model, _ = load_model_and_tokenizer(ModelConfig())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for dim, (a, b) in enumerate(successors.items()):
            model.model.embed_tokens.weight[a, dim] = 1.0
            model.lm_head.weight[b, dim] = 2.0  # x sqrt(hidden_size) after the final RMSNorm
    return model
