"""``deepanalyze``: DeepAnalyze's RL reward (paper Eq. 2-3; reference/deepanalyze.md §4), with its bugs fixed.

    fn = stagewise.rewards.build("deepanalyze")                                   # no judge: rule terms only
    fn = stagewise.rewards.build("deepanalyze", judge={"base_url": "http://127.0.0.1:8000/v1", "model": "m"})
    fn(trajectories, reward_spec=specs, data_source=sources, input_seq=questions, code_calls=..., code_errors=...)

Columns read: ``reward_spec`` (``method``, ``ground_truth``, ``function``), ``data_source`` (when the spec has no
method), ``input_seq`` (the instruction, for the judge; else ``prompt``), and from the agent loop ``code_calls``,
``code_errors``, ``turns`` (when absent they are counted from the trajectory's Execute spans: a span is an error
when it contains ``[Error]:``, and turns = spans + 1).

The rules (pure functions below, in this order):
  1. Only the policy's own text is parsed for tags: the Execute spans are removed first (`strip_execute`). The
     judge still sees the whole trajectory.
  2. Format gate, every task: -1.0 unless the text has a complete ``<Analyze>…</Analyze>`` and a complete
     ``<Answer>…</Answer>`` pair (`format_ok`).
  3. Extra gate for ``datatask`` and ``openresearch``: -1.0 if any ``<Code>`` block is not a fenced python block
     (stripped, it must start with ```` ```python ```` and end with ```` ``` ````; `code_is_fenced`).
  4. ``qa``: the mean of exact match and, with a judge, the ANALYZE judge's 1-5 score / 5 (R = ½(1_acc + S)).
     Exact match: the content of the *last* ``<Answer>…</Answer>``, the text after its last ``Answer:`` marker if
     it has one, stripped, ``==`` the stripped ground truth (``match: normalized`` also ignores case, extra
     whitespace, a final period, thousands separators, and compares numbers as numbers).
  5. ``datatask``: the mean of each judge named in ``reward_spec.function`` (/5; the open-domain judge gives its
     five dimensions as five terms) and the code-success rate (executions without error / executions).
  6. ``openresearch`` (data_source ``research``): report = mean of the open-domain judge's five dimensions / 5,
     code-success rate, turns = min(turns / 10, 1), combined with ``research_weights`` (default: the paper's
     Eq. 3, a third each).
  Without a judge (``judge: null`` or no ``base_url``) the judge terms are left out and the rest is averaged with
  the same weights; this is logged once. So qa = exact match, datatask = code-success rate, research =
  ½(code + turns).

Where we depart from DeepAnalyze's code and why:
  * Tags are read from the policy's text only. They concatenated assistant and execute contents, so a program that
    printed ``<Answer>42</Answer>`` could pass the format gate and plant the answer (the env also defangs tags in
    program output, `stagewise.envs.code_sandbox.defang_tags`).
  * The format gate wants complete pairs, not four substrings anywhere (``</Analyze><Analyze>`` passed theirs).
  * Code-success rate: the agent loop's own counts, where a timeout is an error (their timeout message lacked the
    colon of ``[Error]:`` and counted as a success), and the final Answer turn is not a failed "step without an
    observation". A trajectory that ran no code at all scores 0 on this term, as in theirs.
  * Several scalar judges each keep their own term; theirs stored them under one key, the last overwriting the
    others. Each judge name in ``reward_spec.function`` counts once.
  * A judge that fails or answers without a parsable score makes the sample None ("cannot be scored", counted in
    ``rewards/deepanalyze/errors``); theirs silently scored 0. Unknown methods or judge names raise (None), where
    theirs gave 0.
  * Research uses the paper's weights (⅓ report, ⅓ code, ⅓ turns) by default; their code took an unweighted mean
    of seven terms (five report dimensions, code, turns), i.e. research_weights {report: 5/7, code: 1/7,
    turns: 1/7}, which one can still set.
  * The ANALYZE prompt labels the question as the question (theirs said "[REFERENCE SOLUTION]").
  * A trajectory cut by the context limit is scored like any other (normally -1: it has no answer); theirs got 0
    because the env only scored on ``done``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any, Dict, List, Mapping, Optional

from stagewise.rewards.base import Row, SampleReward, is_missing, prompt_text

logger = logging.getLogger("stagewise.rewards")

METHODS = {"qa": "qa", "datatask": "datatask", "openresearch": "openresearch", "research": "openresearch"}
REPORT_DIMENSIONS = ("usefulness", "richness", "soundness", "interpretability", "readability")
ACCURACY_JUDGE, ANALYZE_JUDGE, OPENDOMAIN_JUDGE = (
    "llm_as_judgement_accuracy", "llm_as_judgement_analyze", "llm_as_judgement_opendomain")
JUDGES = (ACCURACY_JUDGE, ANALYZE_JUDGE, OPENDOMAIN_JUDGE)
DEFAULT_RESEARCH_WEIGHTS = {"report": 1 / 3, "code": 1 / 3, "turns": 1 / 3}

_EXECUTE = re.compile(r"<Execute>.*?(?:</Execute>|\Z)", re.DOTALL)
_CODE = re.compile(r"<Code>(.*?)</Code>", re.DOTALL)
_ANSWER = re.compile(r"<Answer>(.*?)</Answer>", re.DOTALL)
_SCORE = re.compile(r"SCORE:\s*\**\s*([-+]?\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?")


# ============================================================================================ pure rules
def execute_spans(text: str) -> List[str]:
    """Every ``<Execute>…</Execute>`` span of a trajectory (an unclosed last one runs to the end)."""
    return _EXECUTE.findall(text)


def strip_execute(text: str) -> str:
    """The policy's own text: the trajectory without its Execute spans."""
    return _EXECUTE.sub("", text)


def has_pair(text: str, tag: str) -> bool:
    return re.search(f"<{tag}>.*?</{tag}>", text, re.DOTALL) is not None


def format_ok(text: str) -> bool:
    """DeepAnalyze's gate: an Analyze pair and an Answer pair (in the policy's own text)."""
    return has_pair(text, "Analyze") and has_pair(text, "Answer")


def code_blocks(text: str) -> List[str]:
    return _CODE.findall(text)


def code_is_fenced(block: str) -> bool:
    body = block.strip()
    return body.startswith("```python") and body.endswith("```") and len(body) >= len("```python```")


def last_answer_block(text: str) -> Optional[str]:
    """The whole content of the last ``<Answer>…</Answer>``, stripped (what the accuracy judge reads)."""
    answers = _ANSWER.findall(text)
    return answers[-1].strip() if answers else None


def last_answer(text: str) -> Optional[str]:
    """The last ``<Answer>`` content, after its last ``Answer:`` marker if any, stripped; None without one."""
    content = last_answer_block(text)
    if content is None:
        return None
    if "Answer:" in content:
        content = content.rsplit("Answer:", 1)[1]
    return content.strip()


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().casefold()).rstrip(".").strip()


def _as_number(text: str) -> Optional[float]:
    t = text.strip()
    if not _NUMBER.fullmatch(t):
        return None
    value = float(t.rstrip("%").replace(",", ""))
    return value


def exact_match(prediction: Optional[str], gold: Any, match: str = "exact") -> float:
    """1.0 when the prediction equals the ground truth (see the module docstring for ``normalized``), else 0.0."""
    if prediction is None or is_missing(gold):
        return 0.0
    gold_text = str(gold).strip()
    if match == "exact":
        return float(prediction.strip() == gold_text)
    p, g = _normalize(prediction), _normalize(gold_text)
    if p == g:
        return 1.0
    pn, gn = _as_number(p), _as_number(g)
    return float(pn is not None and gn is not None and math.isclose(pn, gn, rel_tol=1e-9, abs_tol=1e-9))


def code_success_rate(calls: int, errors: int) -> float:
    """Executions without error / executions; 0.0 when no code ran."""
    return 0.0 if calls <= 0 else max(0.0, (calls - errors) / calls)


def execute_outcomes(text: str) -> tuple:
    """(executions, errors) counted from the Execute spans of a trajectory."""
    spans = execute_spans(text)
    return len(spans), sum("[Error]:" in s for s in spans)


def turns_reward(turns: int, full_credit_turns: int = 10) -> float:
    return min(max(turns, 0) / full_credit_turns, 1.0)


def weighted_mean(terms: Mapping[str, float], weights: Optional[Mapping[str, float]] = None) -> float:
    """Mean of the terms, weighted by ``weights[name]`` (1 each by default), over the terms present."""
    w = {k: (1.0 if weights is None else float(weights.get(k, 0.0))) for k in terms}
    total = sum(w.values())
    if total <= 0:
        raise ValueError(f"deepanalyze: the weights {dict(weights or {})} give no weight to the terms {list(terms)}")
    return sum(w[k] * v for k, v in terms.items()) / total


def parse_score(reply: str, low: float, high: float) -> float:
    """The last ``SCORE: n`` of a judge reply, clamped to [low, high]; ValueError when there is none."""
    found = _SCORE.findall(reply)
    if not found:
        raise ValueError(f"judge reply has no 'SCORE: <n>': {reply[:200]!r}")
    return min(high, max(low, float(found[-1])))


def parse_dimensions(reply: str) -> Dict[str, float]:
    """The five report dimensions (1-5 each) from a judge reply (a JSON object, possibly inside prose)."""
    scores: Dict[str, float] = {}
    for dim in REPORT_DIMENSIONS:
        found = re.findall(rf'"?{dim}"?\s*:\s*"?([-+]?\d+(?:\.\d+)?)', reply, re.IGNORECASE)
        if not found:
            raise ValueError(f"judge reply has no score for {dim!r}: {reply[:200]!r}")
        scores[dim] = min(5.0, max(1.0, float(found[-1])))
    return scores


def method_of(row: Row) -> str:
    spec = reward_spec_of(row)
    raw = spec.get("method") if spec else None
    if is_missing(raw):
        raw = row.get("data_source")
    if is_missing(raw):
        raise KeyError("deepanalyze: the row has no reward_spec.method and no data_source; columns: "
                       f"{sorted(row)}")
    method = METHODS.get(str(raw).strip().lower())
    if method is None:
        raise ValueError(f"deepanalyze: unknown method {raw!r}; expected one of {sorted(METHODS)}")
    return method


def reward_spec_of(row: Row) -> Dict[str, Any]:
    spec = row.get("reward_spec")
    if isinstance(spec, str):
        spec = json.loads(spec) if spec.strip() else {}
    return dict(spec) if spec else {}


def judge_names(spec: Mapping[str, Any], default: str) -> List[str]:
    """``reward_spec.function`` as a list of distinct judge names (a name, a list, or nothing -> ``default``)."""
    raw = spec.get("function")
    if is_missing(raw) or (not isinstance(raw, str) and hasattr(raw, "__len__") and len(raw) == 0):
        return [default]
    names = [raw] if isinstance(raw, str) else [str(x) for x in raw]
    out = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    for name in out:
        if name not in JUDGES:
            raise ValueError(f"deepanalyze: unknown judge function {name!r} in reward_spec.function; "
                             f"known: {', '.join(JUDGES)}")
    return out


# ============================================================================================ judge prompts
ANALYZE_PROMPT = """You are reviewing the work of an AI data analyst.

[Question]
{question}

[Reference answer]
{reference}

[The analyst's full trajectory: reasoning, code, execution results and answer]
{trajectory}

Rate the quality of the analysis (sound approach, correct use of the data, conclusions supported by the \
execution results) from 1 (poor) to 5 (excellent). Explain briefly, then end with a line "SCORE: <1-5>"."""

ACCURACY_PROMPT = """You are grading the final answer of an AI data analyst.

[Task]
{question}

[Reference solution]
{reference}

[The analyst's final answer]
{answer}

Rate how correct and complete the final answer is with respect to the reference, from 0 (wrong or missing) to \
5 (fully correct). Explain briefly, then end with a line "SCORE: <0-5>"."""

OPENDOMAIN_PROMPT = """You are reviewing a data-analysis report written by an AI analyst.

[Instruction]
{question}

[Data summary]
{reference}

[The analyst's full trajectory, ending with its report]
{trajectory}

First list the main weaknesses of the work. Then rate it from 1 (poor) to 5 (excellent) on usefulness, richness, \
soundness, interpretability and readability, and end with one JSON object on its own line, e.g. \
{{"usefulness": 3, "richness": 4, "soundness": 3, "interpretability": 4, "readability": 5}}."""


# ============================================================================================ the reward
_said_no_judge = False


class DeepAnalyze(SampleReward):
    """DeepAnalyze's trajectory reward; see the module docstring.

    Params: ``judge`` (None, or the params of `stagewise.rewards.judge.Judge`: ``base_url``, ``model``,
    ``api_key_env``, ``timeout_s``, ``max_retries``, ``backoff_s``, ``concurrency``, ``temperature``,
    ``max_tokens``, ``system_prompt``), ``match`` (``exact`` | ``normalized``), ``research_weights``
    (``report``/``code``/``turns``), ``full_credit_turns`` (10), ``datatask_judge`` (the judge for datatask rows
    whose reward_spec names none).
    """

    def __init__(self, judge: Optional[Dict[str, Any]] = None, match: str = "exact",
                 research_weights: Optional[Dict[str, float]] = None, full_credit_turns: int = 10,
                 datatask_judge: str = ACCURACY_JUDGE):
        global _said_no_judge
        if match not in ("exact", "normalized"):
            raise ValueError(f"deepanalyze: match must be 'exact' or 'normalized', got {match!r}")
        weights = dict(DEFAULT_RESEARCH_WEIGHTS if research_weights is None else research_weights)
        unknown = sorted(set(weights) - set(DEFAULT_RESEARCH_WEIGHTS))
        if unknown or any(float(v) < 0 for v in weights.values()):
            raise ValueError(f"deepanalyze: research_weights takes non-negative report/code/turns, got {weights}")
        if full_credit_turns < 1:
            raise ValueError(f"deepanalyze: full_credit_turns must be >= 1, got {full_credit_turns}")
        if datatask_judge not in JUDGES:
            raise ValueError(f"deepanalyze: datatask_judge must be one of {JUDGES}, got {datatask_judge!r}")
        self.match = match
        self.research_weights = {k: float(v) for k, v in weights.items()}
        self.full_credit_turns = int(full_credit_turns)
        self.datatask_judge = datatask_judge
        self.judge = None
        judge = dict(judge or {})
        if judge.get("base_url"):
            from stagewise.rewards.judge import Judge

            if not judge.get("model"):
                raise ValueError("deepanalyze: judge.model is required with judge.base_url")
            self.judge = Judge(**judge)
            self.executor = "thread"  # network-bound: the runner scores samples on `concurrency` threads
            self.concurrency = self.judge.concurrency
        elif self.research_weights.get("code", 0) + self.research_weights.get("turns", 0) <= 0:
            raise ValueError(f"deepanalyze: research_weights={weights} weighs only the report, which needs a judge "
                             "(set judge.base_url, or give code/turns a weight)")
        elif not _said_no_judge:
            _said_no_judge = True
            logger.warning("deepanalyze: no judge configured (reward params judge.base_url): the judge terms are "
                           "left out; qa = exact match, datatask = code-success rate, research = code + turns")

    # ---------------------------------------------------------------------------------------- scoring
    def per_sample(self, completion: str, row: Row) -> float:
        return self.score(completion, row)["total"]

    def score(self, completion: str, row: Row) -> Dict[str, float]:
        """Every term and the total for one trajectory (``gate`` = -1 when a format gate failed)."""
        method = method_of(row)
        spec = reward_spec_of(row)
        own = strip_execute(completion)
        if not format_ok(own):
            return {"gate": -1.0, "total": -1.0}
        if method != "qa" and not all(code_is_fenced(b) for b in code_blocks(own)):
            return {"gate": -1.0, "total": -1.0}
        calls, errors = self._code_facts(completion, row)
        question = self._question(row)
        gold = spec.get("ground_truth") if not is_missing(spec.get("ground_truth")) else row.get("answer")
        reference = "" if is_missing(gold) else str(gold)
        terms: Dict[str, float] = {}
        if method == "qa":
            terms["accuracy"] = exact_match(last_answer(own), gold, self.match)
            if self.judge is not None:
                terms["analysis"] = self._judge_score(ANALYZE_PROMPT, question, reference, completion, 1, 5) / 5
            return {**terms, "total": weighted_mean(terms)}
        code = code_success_rate(calls, errors)
        if method == "datatask":
            if self.judge is not None:
                for name in judge_names(spec, self.datatask_judge):
                    terms.update(self._judge_terms(name, question, reference, completion, own))
            terms["code"] = code
            return {**terms, "total": weighted_mean(terms)}
        # openresearch
        if self.judge is not None:
            dims = self._judge_terms(OPENDOMAIN_JUDGE, question, reference, completion, own)
            terms["report"] = sum(dims.values()) / len(dims)
        terms["code"] = code
        terms["turns"] = turns_reward(self._turns(completion, row), self.full_credit_turns)
        return {**terms, "total": weighted_mean(terms, self.research_weights)}

    def _code_facts(self, completion: str, row: Row) -> tuple:
        calls, errors = row.get("code_calls"), row.get("code_errors")
        if is_missing(calls) or is_missing(errors):
            return execute_outcomes(completion)
        return int(calls), int(errors)

    def _turns(self, completion: str, row: Row) -> int:
        turns = row.get("turns")
        return len(execute_spans(completion)) + 1 if is_missing(turns) else int(turns)

    @staticmethod
    def _question(row: Row) -> str:
        q = row.get("input_seq")
        return prompt_text(row.get("prompt")) if is_missing(q) else str(q)

    def _judge_terms(self, name: str, question: str, reference: str, trajectory: str, own: str) -> Dict[str, float]:
        if name == ACCURACY_JUDGE:
            answer = last_answer_block(own) or ""
            return {"judge_accuracy": self._judge_score(ACCURACY_PROMPT, question, reference, answer, 0, 5) / 5}
        if name == ANALYZE_JUDGE:
            return {"judge_analysis": self._judge_score(ANALYZE_PROMPT, question, reference, trajectory, 1, 5) / 5}
        reply = self.judge.chat(OPENDOMAIN_PROMPT.format(question=question, reference=reference,
                                                         trajectory=trajectory))
        return {dim: v / 5 for dim, v in parse_dimensions(reply).items()}

    def _judge_score(self, template: str, question: str, reference: str, text: str, low: float, high: float
                     ) -> float:
        fields = {"question": question, "reference": reference, "trajectory": text, "answer": text}
        reply = self.judge.chat(template.format(**fields))  # the inserted texts are not parsed for braces
        return parse_score(reply, low, high)


__all__ = ["DeepAnalyze", "code_is_fenced", "code_success_rate", "exact_match", "format_ok", "last_answer",
           "strip_execute", "turns_reward", "weighted_mean"]
