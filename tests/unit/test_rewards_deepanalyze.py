"""reward=deepanalyze: the format gates, exact match on the last Answer, code-success rate (timeouts are errors),
research weights, and the judge terms against a real OpenAI-compatible HTTP server on 127.0.0.1."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stagewise.config import RewardConfig, RewardFnConfig
from stagewise.rewards import RewardRunner, build
from stagewise.rewards.deepanalyze import (
    answer_kind,
    answer_matches,
    code_is_fenced,
    exact_match,
    format_ok,
    last_answer,
    strip_execute,
    turns_reward,
    weighted_mean,
)

FENCED = "<Code>\n```python\nprint(6 * 7)\n```\n</Code>"


def trajectory(answer="Answer: 42", code=FENCED, execute="42", extra=""):
    return (f"<Analyze>plan</Analyze>\n{code}\n<Execute>\n{execute}\n</Execute>\n<Understand>ok</Understand>\n"
            f"{extra}<Answer>{answer}</Answer>")


def qa_row(gold="42", **kw):
    return {"reward_spec": {"method": "qa", "ground_truth": gold, "function": ["llm_as_judgement_analyze"]},
            "data_source": "qa", "input_seq": "What is 6 times 7?", **kw}


def score(fn, completion, row):
    return fn([completion], **{k: [v] for k, v in row.items()})[0]


# ------------------------------------------------------------------------------------------ pure rules
def test_pure_rules():
    assert format_ok("<Analyze>a</Analyze><Answer>b</Answer>")
    assert not format_ok("</Analyze><Analyze><Answer>b</Answer>")  # four substrings, but no pair
    assert not format_ok("<Analyze>a</Analyze>")
    assert strip_execute("a<Execute>\nx\n</Execute>b<Execute>unclosed <Answer>1</Answer>") == "ab"
    assert last_answer("<Answer>Answer: 1</Answer> <Answer>So the Answer: 2 </Answer>") == "2"
    assert last_answer("<Answer> plain </Answer>") == "plain"
    assert last_answer("no answer") is None
    assert code_is_fenced("\n```python\nx = 1\n```\n") and not code_is_fenced("x = 1") \
        and not code_is_fenced("```\nx = 1\n```")
    assert exact_match("42", "42") == 1.0 and exact_match("42.0", "42") == 0.0
    assert exact_match("42.0", "42", "normalized") == 1.0 and exact_match("1,234.50", "1234.5", "normalized") == 1.0
    assert exact_match("north.", "North", "normalized") == 1.0 and exact_match("north", "North") == 0.0
    assert exact_match(None, "1") == 0.0
    assert turns_reward(4) == 0.4 and turns_reward(25) == 1.0
    assert weighted_mean({"a": 1.0, "b": 0.0}, {"a": 3, "b": 1}) == 0.75


# ------------------------------------------------------------------------------------------ no judge
@pytest.fixture(scope="module")
def rule_only():
    return build("deepanalyze")


def test_format_gate_is_minus_one_and_reads_only_the_policy_text(rule_only):
    assert score(rule_only, trajectory(), qa_row()) == 1.0
    assert score(rule_only, trajectory().replace("<Analyze>plan</Analyze>", "plan"), qa_row()) == -1.0
    # an Answer printed by the code (inside Execute) neither passes the gate nor counts as the answer
    planted = "<Analyze>p</Analyze>\n" + FENCED + "\n<Execute>\n<Answer>Answer: 42</Answer>\n</Execute>\n"
    assert score(rule_only, planted, qa_row()) == -1.0
    # a fake Execute written by the policy hides what follows it
    assert score(rule_only, "<Analyze>p</Analyze><Execute>made up <Answer>Answer: 42</Answer>", qa_row()) == -1.0


def test_qa_is_exact_match_on_the_last_answer(rule_only):
    assert score(rule_only, trajectory(answer="Answer: 41"), qa_row()) == 0.0
    assert score(rule_only, trajectory(answer="The result. Answer:  42 "), qa_row()) == 1.0
    assert score(rule_only, trajectory(extra="<Answer>Answer: 42</Answer>", answer="Answer: 7"), qa_row()) == 0.0
    # qa does not require fenced code
    assert score(rule_only, trajectory(code="<Code>print(42)</Code>"), qa_row()) == 1.0
    assert score(build("deepanalyze", match="normalized"), trajectory(answer="Answer: 42.00"), qa_row()) == 1.0


def test_datatask_code_success_rate_and_fence_gate(rule_only):
    row = {"reward_spec": {"method": "datatask", "ground_truth": "table", "function": "llm_as_judgement_accuracy"},
           "data_source": "datatask"}
    assert score(rule_only, trajectory(), {**row, "code_calls": 3, "code_errors": 1}) == pytest.approx(2 / 3)
    # no code step, no judge, no gold answer: no term is left, the sample scores 0.0
    assert rule_only.score(trajectory(), {**row, "code_calls": 0, "code_errors": 0}) == {"total": 0.0}
    assert score(rule_only, trajectory(code="<Code>print(1)</Code>"), row) == -1.0  # unfenced code
    # without the loop's columns: counted from the Execute spans; the sandbox's timeout message is an error
    two = trajectory(execute="[Error]:\nPython code execution timed out after 10.0 seconds.",
                     extra=FENCED + "\n<Execute>\n42\n</Execute>\n")
    assert score(rule_only, two, row) == 0.5


def test_research_uses_the_paper_weights_and_turns(rule_only):
    row = {"reward_spec": {"method": "openresearch", "ground_truth": "thumbnail"}, "data_source": "research"}
    # no judge: report left out; code 1.0 and turns min(3/10, 1) weighted 1/3 each -> their mean
    assert score(rule_only, trajectory(), {**row, "code_calls": 2, "code_errors": 0, "turns": 3}) \
        == pytest.approx((1.0 + 0.3) / 2)
    weighted = build("deepanalyze", research_weights={"report": 0.5, "code": 0.1, "turns": 0.4})
    assert score(weighted, trajectory(), {**row, "code_calls": 2, "code_errors": 1, "turns": 20}) \
        == pytest.approx((0.1 * 0.5 + 0.4 * 1.0) / 0.5)
    # data_source alone selects the method; turns counted from the text (1 Execute span + 1)
    assert score(rule_only, trajectory(), {"data_source": "research"}) == pytest.approx((1.0 + 0.2) / 2)


def test_no_code_step_leaves_the_code_term_out(rule_only):
    """DeepAnalyze adds the code term only `if len(self.code_pass) > 0`: an answer at the first turn has none."""
    data = {"reward_spec": {"method": "datatask", "ground_truth": "t"}, "code_calls": 0, "code_errors": 0}
    assert rule_only.score(trajectory(), {**data, "answer": "42"}) == {"answer": 1.0, "total": 1.0}
    research = {"reward_spec": {"method": "openresearch", "ground_truth": "t"}, "code_calls": 0, "code_errors": 0,
                "turns": 3}
    assert rule_only.score(trajectory(), research) == pytest.approx({"turns": 0.3, "total": 0.3})
    # a non-final turn without code is a code step that failed (the env answered with the "no code" error)
    assert rule_only.score(trajectory(), {**data, "answer": "42", "code_calls": 1, "code_errors": 1}) \
        == {"answer": 1.0, "code": 0.0, "total": 0.5}


def test_gold_answer_match_kinds():
    # exact: case, whitespace and a final period ignored, nothing else
    assert answer_matches("north.", "North") == 1.0
    assert answer_matches("North  East", "north east") == 1.0
    assert answer_matches("North East", "North") == 0.0
    assert answer_matches("42.0", "42", "exact") == 0.0
    # numeric: the prediction's one number, within max(abs_tol, rel_tol * |gold|)
    assert answer_matches("$1,234.50", "1234.5") == 1.0
    assert answer_matches("The total is 18 orders", "18") == 1.0
    assert answer_matches("18 of 20", "18") == 0.0  # two numbers: which one is the answer is unknown
    assert answer_matches("45%", "45") == 1.0
    assert answer_matches("12.35", "12.35") == 1.0
    assert answer_matches("12.3456", "12.35") == 0.0
    assert answer_matches("100.4", "100", "numeric", rel_tol=0.005) == 1.0  # |0.4| <= 0.005 * 100
    assert answer_matches("100.6", "100", "numeric", rel_tol=0.005) == 0.0
    assert answer_matches("0.0000005", "0", "numeric", abs_tol=1e-6) == 1.0
    assert answer_matches("no number", "3") == 0.0
    # set: the same items in any order
    assert answer_matches("South, north", ["North", "South"]) == 1.0
    assert answer_matches("North", ["North", "South"]) == 0.0
    assert answer_matches("North, South, East", ["North", "South"]) == 0.0
    assert answer_matches("1, 2.0", "[2, 1]") == 1.0
    assert answer_matches("['West', 'East']", "East and West", "set") == 1.0
    assert answer_matches("North and South", "North; South", "set") == 1.0
    # auto picks the kind from the gold answer
    assert [answer_kind(g) for g in (["a"], "[1, 2]", "42", "$3.50", "North", "18 of 20")] \
        == ["set", "set", "numeric", "numeric", "exact", "exact"]
    assert answer_matches(None, "1") == 0.0
    with pytest.raises(ValueError, match="answer_match must be one of"):
        answer_matches("1", "1", "fuzzy")


def test_datatask_scores_the_gold_answer_without_a_judge(rule_only):
    row = {"reward_spec": {"method": "datatask", "ground_truth": "the saved table"}, "data_source": "datatask",
           "answer": "42"}
    # right answer, 3 code steps with 1 error: (1 + 2/3) / 2
    assert rule_only.score(trajectory(), {**row, "code_calls": 3, "code_errors": 1}) \
        == pytest.approx({"answer": 1.0, "code": 2 / 3, "total": 5 / 6})
    # wrong answer, clean code: 0.5 (before the answer term it scored 1.0)
    assert score(rule_only, trajectory(answer="Answer: 41"), {**row, "code_calls": 2, "code_errors": 0}) == 0.5
    # the gold answer may sit in reward_spec; the row's answer_match picks the kind
    in_spec = {"reward_spec": {"method": "datatask", "ground_truth": "t", "answer": "North; South"},
               "answer_match": "set", "code_calls": 1, "code_errors": 0}
    assert score(rule_only, trajectory(answer="I saved it. Answer: South, North"), in_spec) == 1.0
    assert score(rule_only, trajectory(answer="Answer: South"), in_spec) == 0.5
    numeric = build("deepanalyze", answer_match="numeric", answer_rel_tol=0.01)
    assert score(numeric, trajectory(answer="Answer: 41.7"), {**row, "code_calls": 1, "code_errors": 0}) == 1.0
    assert score(numeric, trajectory(answer="Answer: 41.5"), {**row, "code_calls": 1, "code_errors": 0}) == 0.5
    # the format gate still comes first
    assert score(rule_only, trajectory().replace("<Analyze>plan</Analyze>", ""), row) == -1.0


def test_bad_rows_and_params_are_errors(rule_only):
    with pytest.raises(ValueError, match="unknown method 'sql'"):
        rule_only.per_sample(trajectory(), {"reward_spec": {"method": "sql"}})
    with pytest.raises(KeyError, match="no reward_spec.method and no data_source"):
        rule_only.per_sample(trajectory(), {})
    with pytest.raises(TypeError, match="unknown param"):
        build("deepanalyze", judge_url="x")
    with pytest.raises(ValueError, match="match must be"):
        build("deepanalyze", match="fuzzy")
    with pytest.raises(ValueError, match="answer_match must be one of"):
        build("deepanalyze", answer_match="fuzzy")
    with pytest.raises(ValueError, match="must be >= 0"):
        build("deepanalyze", answer_rel_tol=-1.0)
    with pytest.raises(ValueError, match="weighs only the report"):
        build("deepanalyze", research_weights={"report": 1.0})
    with pytest.raises(ValueError, match="judge.model is required"):
        build("deepanalyze", judge={"base_url": "http://127.0.0.1:1/v1"})


# ------------------------------------------------------------------------------------------ with a judge
class JudgeServer:
    """Answers by the prompt kind; a trajectory containing JUDGE-DOWN gets HTTP 401, NO-SCORE a reply without one."""

    def __init__(self):
        self.requests = []
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                with lock:
                    server.requests.append(content)
                if "JUDGE-DOWN" in content:
                    return self.send(401, {"error": "bad key"})
                if "NO-SCORE" in content:
                    text = "I cannot grade this."
                elif "[Data summary]" in content:
                    text = ('Weaknesses: thin.\n{"usefulness": 4, "richness": 3, "soundness": 5, '
                            '"interpretability": 2, "readability": 1}')
                elif "[The analyst's final answer]" in content:
                    text = "Mostly right. SCORE: 3"
                else:
                    text = "Sound analysis. SCORE: 4"
                self.send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

            def send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def judge_server():
    server = JudgeServer()
    yield server
    server.close()


def judged(server, **params):
    return build("deepanalyze", judge={"base_url": server.url, "model": "judge-m", "max_retries": 0,
                                       "timeout_s": 5.0, "concurrency": 4}, **params)


def test_qa_with_judge_is_half_exact_match_half_judge(judge_server):
    fn = judged(judge_server)
    assert fn.executor == "thread"
    start = len(judge_server.requests)
    assert score(fn, trajectory(), qa_row()) == pytest.approx(0.5 * (1 + 4 / 5))
    assert score(fn, trajectory(answer="Answer: 1"), qa_row()) == pytest.approx(0.5 * (0 + 4 / 5))
    sent = judge_server.requests[start]
    assert "[Question]\nWhat is 6 times 7?" in sent and "<Execute>\n42\n</Execute>" in sent  # the whole trajectory
    assert score(fn, trajectory().replace("<Analyze>plan</Analyze>", ""), qa_row()) == -1.0  # gate before judge
    assert len(judge_server.requests) == start + 2


def test_datatask_keeps_one_term_per_judge(judge_server):
    fn = judged(judge_server)
    row = {"reward_spec": {"method": "datatask", "ground_truth": "the table",
                           "function": ["llm_as_judgement_accuracy", "llm_as_judgement_analyze",
                                        "llm_as_judgement_accuracy"]},
           "input_seq": "Save the table", "code_calls": 2, "code_errors": 1}
    start = len(judge_server.requests)
    # accuracy 3/5, analysis 4/5 and code 1/2 each count (DeepAnalyze kept only the last scalar judge)
    assert score(fn, trajectory(), row) == pytest.approx((0.6 + 0.8 + 0.5) / 3)
    accuracy_prompt = [r for r in judge_server.requests[start:] if "[The analyst's final answer]" in r][0]
    assert accuracy_prompt.rstrip().split("[The analyst's final answer]\n")[1].startswith("Answer: 42\n")
    assert "<Execute>" not in accuracy_prompt  # the accuracy judge sees only the final answer
    assert fn.score(trajectory(), row) == pytest.approx(
        {"judge_accuracy": 0.6, "judge_analysis": 0.8, "code": 0.5, "total": 1.9 / 3})


def test_datatask_with_judge_and_gold_answer(judge_server):
    fn = judged(judge_server)
    row = {"reward_spec": {"method": "datatask", "ground_truth": "the table", "function": "llm_as_judgement_accuracy"},
           "input_seq": "Save the table", "answer": "42", "code_calls": 2, "code_errors": 1}
    # judge accuracy 3/5, answer 1, code 1/2
    assert fn.score(trajectory(), row) == pytest.approx(
        {"judge_accuracy": 0.6, "answer": 1.0, "code": 0.5, "total": (0.6 + 1.0 + 0.5) / 3})
    # no code step: the judge and the answer only
    assert fn.score(trajectory(answer="Answer: 7"), {**row, "code_calls": 0, "code_errors": 0}) == pytest.approx(
        {"judge_accuracy": 0.6, "answer": 0.0, "total": 0.3})


def test_research_report_dimensions_with_weights(judge_server):
    row = {"reward_spec": {"method": "openresearch", "ground_truth": "sales.csv: 12 rows",
                           "function": "llm_as_judgement_opendomain"},
           "input_seq": "Write a report", "code_calls": 1, "code_errors": 0, "turns": 4}
    report = (4 + 3 + 5 + 2 + 1) / 5 / 5
    assert score(judged(judge_server), trajectory(), row) == pytest.approx((report + 1.0 + 0.4) / 3)
    theirs = judged(judge_server, research_weights={"report": 5 / 7, "code": 1 / 7, "turns": 1 / 7})
    assert score(theirs, trajectory(), row) == pytest.approx((5 * report + 1.0 + 0.4) / 7)


def test_judge_failures_are_none_and_counted(judge_server):
    params = {"judge": {"base_url": judge_server.url, "model": "judge-m", "max_retries": 0, "timeout_s": 5.0}}
    cfg = RewardConfig(functions=[RewardFnConfig(name="deepanalyze", params=params)])
    completions = [trajectory(), trajectory(extra="JUDGE-DOWN "), trajectory(extra="NO-SCORE ")]
    with RewardRunner(cfg) as runner:
        result = runner(completions, **{k: [v] * 3 for k, v in qa_row().items()})
    assert result.per_fn["deepanalyze"] == [pytest.approx(0.9), None, None]
    assert result.metrics["rewards/deepanalyze/errors"] == 2.0 and result.total == [pytest.approx(0.9), 0.0, 0.0]
