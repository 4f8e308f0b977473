"""The R1-Zero reproduction's console block (FareedKhan-dev/train-deepseek-r1) for RL stages, built from one
flat metrics dict (the record that goes to metrics.jsonl), so the console never shows a number the logs do not have::

    Step   10 | Loss: 0.0123 | LR: 5.00e-05 | Epoch: 0.50
             GRPO | Policy: 0.0118 | KL: 0.0004 | Entropy: 2.3121
    Reward Breakdown:
      accuracy       :  0.750 ± 0.433 [ 0.000,  1.000]
      format         :  0.875 ± 0.331 [ 0.000,  1.000]
      total          :  1.625 (combined)
    Generation Quality:
      Format compliance:  87.5% (7/8)
      Avg response length:  145.3 chars (41.2 tokens, 0.0% truncated)
      Reasoning indicators:  2.14 per response
    Performance:
      Step time:      3.24s (generate 2.10s, score 0.05s, log-probs 0.30s, update 0.79s)
      Samples/sec:    2.5
      RAM (RSS):      1.21GB

Departure from that recipe: its second line shows a "Value" loss, which GRPO does not have (no critic); we show the
KL to the reference there (``-`` when ``algorithm.beta`` is 0 and no reference is computed). Format compliance and
reasoning indicators use the same rules as the ``format`` and ``reasoning_steps`` rewards
(`stagewise.rewards.format`), whether or not those rewards are configured; compliance also counts DeepAnalyze's
layout (`format_indicators`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from stagewise.rewards.deepanalyze import format_ok, strip_execute
from stagewise.rewards.format import FORMAT_RE, STEP_RE
from stagewise.tracking.tracker import format_metrics_line


def format_indicators(text: str) -> tuple[bool, int]:
    """``(well-formed, number of reasoning indicators)`` of one completion. Well-formed: the R1 layout
    (``<think>…</think><answer>…</answer>``), or DeepAnalyze's (an Analyze pair and an Answer pair in the policy's
    own text, `stagewise.rewards.deepanalyze.format_ok`): a completion cannot be in both, so an agentic run's
    compliance is not 0% for want of ``<think>`` tags."""
    well_formed = bool(FORMAT_RE.match(text)) or format_ok(strip_execute(text))
    return well_formed, len(STEP_RE.findall(text))


def _num(metrics: Mapping[str, Any], key: str) -> float | None:
    v = metrics.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _fmt(v: float | None, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    text = format(v, spec)
    if text.lstrip().startswith("-") and float(text) == 0:  # "-0.0000" is float noise around 0, not a sign
        text = text.replace("-", " " if text.startswith(" ") else "", 1)
    return text


def reward_names(metrics: Mapping[str, Any]) -> list[str]:
    """Reward function names in logging order, from ``reward/<fn>/mean`` keys (``total`` excluded)."""
    names = []
    for key in metrics:
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "reward" and parts[2] == "mean" and parts[1] != "total":
            names.append(parts[1])
    return names


def format_grpo_console(step: int, metrics: Mapping[str, Any]) -> str:
    """The block for a training record; records without ``loss`` (eval, data reports) get the one-line format."""
    if "loss" not in metrics:
        return format_metrics_line(step, metrics)
    m = metrics
    loss = _fmt(_num(m, "loss"), ".4f")
    if _num(m, "optimizer_steps") == 1 and loss == "0.0000":  # why, where people look (stages/grpo.py docstring)
        loss += " (on-policy: ~0 by construction, its gradient is not)"
    lines = [
        f"Step {step:>4} | Loss: {loss} | LR: {_fmt(_num(m, 'lr'), '.2e')} | "
        f"Epoch: {_fmt(_num(m, 'epoch'), '.2f')}",
        f"         GRPO | Policy: {_fmt(_num(m, 'policy_loss'), '.4f')} | KL: {_fmt(_num(m, 'kl'), '.4f')} | "
        f"Entropy: {_fmt(_num(m, 'entropy'), '.4f')} | Clip: {_fmt(_pct(_num(m, 'clip_ratio/region_mean')), '.1f')}% "
        f"| Grad norm: {_fmt(_num(m, 'grad_norm'), '.3f')}",
        "",
        "Reward Breakdown:",
    ]
    names = reward_names(m)
    width = max([15] + [len(n) for n in names])
    for name in names:
        lines.append(
            f"  {name:<{width}}: {_fmt(_num(m, f'reward/{name}/mean'), '6.3f')} ± "
            f"{_fmt(_num(m, f'reward/{name}/std'), '.3f')} [{_fmt(_num(m, f'reward/{name}/min'), '6.3f')}, "
            f"{_fmt(_num(m, f'reward/{name}/max'), '6.3f')}]")
    lines.append(f"  {'total':<{width}}: {_fmt(_num(m, 'reward/total/mean'), '6.3f')} (combined)")
    ok, n = _num(m, "quality/format_ok"), _num(m, "quality/num_completions")
    counts = f" ({int(ok)}/{int(n)})" if ok is not None and n is not None else ""
    lines += [
        "",
        "Generation Quality:",
        f"  Format compliance: {_fmt(_pct(_num(m, 'quality/format_compliance')), '5.1f')}%{counts}",
        f"  Avg response length: {_fmt(_num(m, 'completions/mean_chars'), '6.1f')} chars "
        f"({_fmt(_num(m, 'completions/mean_length'), '.1f')} tokens, "
        f"{_fmt(_pct(_num(m, 'completions/clipped_ratio')), '.1f')}% truncated)",
    ]
    # step markers ("Step 1:", "First,", ...) mean something in R1-style reasoning; elsewhere a row of zeros does not
    if (_num(m, "quality/reasoning_indicators") or 0) > 0 or "reasoning_steps" in names:
        lines.append(f"  Reasoning indicators: {_fmt(_num(m, 'quality/reasoning_indicators'), '5.2f')} per response")
    if _num(m, "env/turns/mean") is not None:  # multi-turn (env=code_sandbox)
        lines.append(f"  Multi-turn: {_fmt(_num(m, 'env/turns/mean'), '.2f')} turns, "
                     f"{_fmt(_num(m, 'env/code_calls/mean'), '.2f')} code runs per trajectory, "
                     f"{_fmt(_pct(_num(m, 'env/code_error_rate')), '.1f')}% of runs failed")
    env = f", env {_fmt(_num(m, 'time/env'), '.2f')}s of it" if _num(m, "time/env") is not None else ""
    lines += [
        "",
        "Performance:",
        f"  Step time:      {_fmt(_num(m, 'time/step'), '.2f')}s (generate {_fmt(_num(m, 'time/generate'), '.2f')}s"
        f"{env}, score {_fmt(_num(m, 'time/score'), '.2f')}s, log-probs {_fmt(_num(m, 'time/logprobs'), '.2f')}s, "
        f"update {_fmt(_num(m, 'time/update'), '.2f')}s)",
        f"  Samples/sec:    {_fmt(_num(m, 'perf/samples_per_s'), '.1f')}",
    ]
    if _num(m, "memory/gpu_max_allocated_gb") is not None:
        lines.append(f"  GPU memory:     {_fmt(_num(m, 'memory/gpu_max_allocated_gb'), '.2f')}GB")
    else:
        lines.append(f"  RAM (RSS):      {_fmt(_num(m, 'memory/rss_gb'), '.2f')}GB")
    return "\n".join(lines)


def _pct(v: float | None) -> float | None:
    return None if v is None else 100.0 * v
