"""Early stopping inside `stage=sft` and `stage=grpo`: the run stops when the rule says so, and final/ is the best
model (not the last one), compared tensor by tensor with the checkpoints and the initial model."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from conftest import only_run_dir, run_train

EVAL16 = 'data.eval_sources=[{path:"generator:arithmetic",split:test,generator_kwargs:{n:16,max_value:99}}]'


def _records(run, key):
    return {r["step"]: r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_generative_eval_and_early_stopping_keep_the_best_model(tmp_path):
    """mode=max on a falling eval loss makes the step-2 eval the best, so with patience 1 the run must stop at the
    step-4 eval and final/ must hold the step-2 weights. With reward=tiny, SFT also generates and scores."""
    proc = run_train(["stage=sft", "data=tiny_sft", EVAL16, "reward=tiny", "rollout.max_new_tokens=16",
                      "stage.max_steps=30", "stage.eval_steps=2", "stage.save_steps=2", "stage.save_total_limit=3",
                      "stage.learning_rate=1e-3", "stage.logging_steps=1", "stage.early_stopping_metric=eval/loss",
                      "stage.early_stopping_mode=max", "stage.early_stopping_patience=1",
                      "logger.progress_bar=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run_dir(tmp_path)
    losses = _records(run, "eval/loss")
    assert sorted(losses) == [2, 4] and losses[4] < losses[2]  # stopped at the second eval, long before step 30
    assert max(_records(run, "loss")) == 4
    acc = _records(run, "eval/accuracy")
    assert sorted(acc) == [0, 2, 4] and all(0.0 <= v <= 1.0 for v in acc.values())  # 0: the baseline eval
    assert _records(run, "eval/num_prompts")[2] == 16 and "eval/reward/accuracy/mean" in json.loads(
        (run / "metrics.jsonl").read_text().splitlines()[-1])

    info = json.loads((run / "final" / "early_stopping.json").read_text())
    assert (info["best_step"], info["last_step"], info["stopped_early"], info["final_is"]) == (2, 4, True, "best")
    assert info["best"] == losses[2] and info["mode"] == "max"
    final = load_file(run / "final" / "model.safetensors")
    assert _same(final, load_file(run / "checkpoints" / "step_2" / "model" / "model.safetensors"))
    assert not _same(final, load_file(run / "checkpoints" / "step_4" / "model" / "model.safetensors"))
    assert json.loads((run / "best" / "best.json").read_text())["best_step"] == 2
    assert (run / "final" / "tokenizer.json").exists() and (run / "final" / "config.json").exists()


def test_grpo_early_stopping_on_a_metric_that_never_improves_returns_the_initial_model(tmp_path):
    """The step-0 eval is the baseline; min_delta 100 tokens makes every later eval 'no improvement', so patience 1
    stops the run after step 1 and final/ is the untouched starting model (the reward varies with the text, so the
    step-1 update does move the weights)."""
    (tmp_path / "reward.py").write_text("def chars(completions, **kw):\n"
                                        "    return [(sum(map(ord, c)) % 5) / 4 for c in completions]\n")
    reward = f"reward.functions=[{{name:'{tmp_path}/reward.py:chars'}}]"
    proc = run_train(["stage=grpo", "data=tiny_grpo", EVAL16, reward, "rollout.n=4",
                      "rollout.max_new_tokens=8", "stage.prompts_per_step=4", "stage.max_steps=6",
                      "stage.learning_rate=1e-2", "stage.eval_steps=1", "stage.save_steps=1", "stage.samples_steps=0",
                      "stage.early_stopping_metric=eval/completions/mean_length", "stage.early_stopping_mode=max",
                      "stage.early_stopping_min_delta=100", "stage.early_stopping_patience=1",
                      "logger.progress_bar=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run_dir(tmp_path)
    assert sorted(_records(run, "eval/completions/mean_length")) == [0, 1]
    info = json.loads((run / "final" / "early_stopping.json").read_text())
    assert (info["best_step"], info["last_step"], info["stopped_early"]) == (0, 1, True)

    from stagewise.config import ModelConfig
    from stagewise.models import load_model_and_tokenizer

    initial = {k: v.contiguous() for k, v in load_model_and_tokenizer(ModelConfig())[0].state_dict().items()}
    final = load_file(run / "final" / "model.safetensors")
    assert _same(final, {k: initial[k] for k in final})
    assert not _same(final, load_file(run / "checkpoints" / "step_1" / "model" / "model.safetensors"))
