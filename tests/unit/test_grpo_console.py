"""The GRPO console block (the R1-Zero reproduction's log format), built from a metrics record, the generation-quality
counters behind it, and the progress bars of every stage."""

import sys

import pytest

from stagewise.tracking.console import format_grpo_console, format_indicators, reward_names

RECORD = {
    "loss": 2.345, "lr": 5e-5, "epoch": 0.5, "policy_loss": 1.234, "kl": 0.0123, "entropy": 0.089,
    "clip_ratio/region_mean": 0.031, "grad_norm": 0.75,
    "reward/accuracy/mean": 0.75, "reward/accuracy/std": 0.433, "reward/accuracy/min": 0.0,
    "reward/accuracy/max": 1.0, "reward/accuracy/none": 0.0,
    "reward/format/mean": 0.875, "reward/format/std": 0.331, "reward/format/min": 0.0, "reward/format/max": 1.0,
    "reward/reasoning_steps/mean": 0.625, "reward/reasoning_steps/std": 0.217, "reward/reasoning_steps/min": 0.33,
    "reward/reasoning_steps/max": 1.0,
    "reward/total/mean": 2.25, "reward/total/std": 0.9,
    "quality/format_ok": 7.0, "quality/num_completions": 8.0, "quality/format_compliance": 0.875,
    "completions/mean_chars": 145.3, "completions/mean_length": 41.25, "completions/clipped_ratio": 0.125,
    "quality/reasoning_indicators": 2.14,
    "time/step": 3.24, "time/generate": 2.1, "time/score": 0.05, "time/logprobs": 0.3, "time/update": 0.79,
    "perf/samples_per_s": 2.469, "memory/gpu_max_allocated_gb": 4.321,
}

EXPECTED = """\
Step   10 | Loss: 2.3450 | LR: 5.00e-05 | Epoch: 0.50
         GRPO | Policy: 1.2340 | KL: 0.0123 | Entropy: 0.0890 | Clip: 3.1% | Grad norm: 0.750

Reward Breakdown:
  accuracy       :  0.750 ± 0.433 [ 0.000,  1.000]
  format         :  0.875 ± 0.331 [ 0.000,  1.000]
  reasoning_steps:  0.625 ± 0.217 [ 0.330,  1.000]
  total          :  2.250 (combined)

Generation Quality:
  Format compliance:  87.5% (7/8)
  Avg response length:  145.3 chars (41.2 tokens, 12.5% truncated)
  Reasoning indicators:  2.14 per response

Performance:
  Step time:      3.24s (generate 2.10s, score 0.05s, log-probs 0.30s, update 0.79s)
  Samples/sec:    2.5
  GPU memory:     4.32GB"""


def test_block_matches_the_r1_zero_reproduction_layout():
    assert format_grpo_console(10, RECORD) == EXPECTED


def test_missing_kl_and_cpu_memory():
    record = {k: v for k, v in RECORD.items() if k not in ("kl", "memory/gpu_max_allocated_gb")}
    record["memory/rss_gb"] = 0.5
    text = format_grpo_console(3, record)
    assert "| KL: - |" in text
    assert text.endswith("  RAM (RSS):      0.50GB")


def test_float_noise_around_zero_has_no_sign():
    text = format_grpo_console(1, {**RECORD, "loss": -1e-9, "policy_loss": -2e-6})
    assert text.startswith("Step    1 | Loss: 0.0000 |")
    assert "GRPO | Policy: 0.0000 |" in text


def test_records_without_loss_use_the_one_line_format():
    assert format_grpo_console(0, {"eval/reward/total/mean": 0.25}) == "step     0 | eval/reward/total/mean 0.25"


def test_reward_names_keep_logging_order_and_skip_total():
    assert reward_names(RECORD) == ["accuracy", "format", "reasoning_steps"]


@pytest.mark.parametrize("text, ok, indicators", [
    ("<think>a</think><answer>1</answer>", True, 0),
    ("  <think>\nStep 1: x\nStep 2: y\n</think>\n<answer>3</answer>\n", True, 2),
    ("First, a\n- b\n2. c", False, 3),
    ("<answer>1</answer><think>x</think>", False, 0),
    ("<think>x</think><answer>1</answer> trailing", False, 0),
    # DeepAnalyze's layout: an Analyze pair and an Answer pair in the policy's text
    ("<Analyze>a</Analyze>\n<Code>\nprint(7)\n</Code>\n<Execute>\n7\n\n</Execute>\n<Answer>Answer:\n7</Answer>", True, 0),
    ("<Analyze>a</Analyze>\n<Code>\nprint(7)\n</Code>", False, 0),
    # an Answer pair that only the program printed (inside Execute) is not the policy's
    ("<Analyze>a</Analyze><Code>x</Code>\n<Execute>\n<Answer>7</Answer>\n</Execute>\n", False, 0),
])
def test_format_and_reasoning_indicators(text, ok, indicators):
    assert format_indicators(text) == (ok, indicators)


def test_progress_bar_only_on_a_terminal_with_log_lines_above_it_until_closed():
    """Redirected output gets no bar fragments; on a terminal, log records go through the bar's writer (printed
    above it, never glued to it) while it is open, SFT's and evaluation's bars as GRPO's."""
    import io
    import logging

    from stagewise.tracking.tracker import progress

    redirected = io.StringIO()
    bar = progress(total=3, desc="sft", stream=redirected)
    bar.update(3)
    bar.close()
    assert redirected.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    root.addHandler(console)
    try:
        terminal = Terminal()
        bar = progress(total=3, desc="sft", stream=terminal)
        assert console not in root.handlers and any("Tqdm" in type(h).__name__ for h in root.handlers)
        bar.update(1)
        bar.close()
        assert "sft" in terminal.getvalue() and console in root.handlers  # drawn, and the console handler is back
    finally:
        root.removeHandler(console)


def test_an_on_policy_zero_loss_says_why():
    text = format_grpo_console(5, {**RECORD, "loss": 1e-7, "optimizer_steps": 1.0})
    assert text.startswith("Step    5 | Loss: 0.0000 (on-policy: ~0 by construction, its gradient is not) | LR:")
    # several optimizer steps per batch (ratio moves), or a loss that is not ~0: no note
    assert "on-policy" not in format_grpo_console(5, {**RECORD, "loss": 1e-7, "optimizer_steps": 2.0})
    assert "on-policy" not in format_grpo_console(5, {**RECORD, "loss": 0.25, "optimizer_steps": 1.0})


def test_reasoning_indicators_only_where_they_mean_something_and_multi_turn_facts():
    agentic = {k: v for k, v in RECORD.items() if not k.startswith("reward/reasoning_steps")}
    agentic.update({"quality/reasoning_indicators": 0.0, "env/turns/mean": 2.5, "env/code_calls/mean": 1.5,
                    "env/code_error_rate": 0.25, "time/env": 0.6})
    text = format_grpo_console(7, agentic)
    assert "Reasoning indicators" not in text
    assert "  Multi-turn: 2.50 turns, 1.50 code runs per trajectory, 25.0% of runs failed" in text
    assert "(generate 2.10s, env 0.60s of it, score 0.05s," in text
    # an R1-style run keeps the line even at zero (its reasoning_steps reward says the markers matter)
    assert "  Reasoning indicators:  0.00 per response" in format_grpo_console(
        7, {**RECORD, "quality/reasoning_indicators": 0.0})
    assert "Multi-turn" not in format_grpo_console(7, RECORD)
