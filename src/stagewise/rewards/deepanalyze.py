"""``deepanalyze``: DeepAnalyze's RL reward (arXiv:2510.16872 Eq. 2-3, and ``DeepAnalyzeEnv._get_reward`` in
examples/deepanalyze/deepanalyze_env.py of their SkyRL copy, https://github.com/ruc-datalab/DeepAnalyze), with its
bugs fixed.

    fn = stagewise.rewards.build("deepanalyze")                                   # no judge: rule terms only
    fn = stagewise.rewards.build("deepanalyze", judge={"base_url": "http://127.0.0.1:8000/v1", "model": "m"})
    fn(trajectories, reward_spec=specs, data_source=sources, input_seq=questions, code_calls=..., code_errors=...)

Columns read: ``reward_spec`` (``method``, ``ground_truth``, ``function``, optional ``answer``), ``data_source``
(when the spec has no method), ``input_seq`` (the instruction, for the judge; else ``prompt``), ``answer`` (a gold
answer, optional) and ``answer_match`` (its match kind, optional), and from the agent loop ``code_calls``,
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
     five dimensions as five terms), the answer term when the row has a gold answer (see below), and the
     code-success rate (code steps without error / code steps).
     Code steps are the non-final turns: each ran a block or, having none, got the "no code" error. A trajectory
     with no code step (it answered at its first turn) has no code term: the term is left out of the mean, as in
     theirs (``if len(self.code_pass) > 0``), not scored 0.
     Gold answer: the row's ``answer`` column (else ``reward_spec.answer``). The answer term is 1.0 when the last
     Answer (after its last ``Answer:``) matches it, else 0.0, by ``answer_match`` (the row's column, else the
     param; `answer_matches`): ``exact`` (equal after case, whitespace and a final period are ignored),
     ``numeric`` (the prediction's one number within ``max(answer_abs_tol, answer_rel_tol * |gold|)``; thousands
     separators, a leading currency sign and a trailing % are ignored), ``set`` (the same items in any order:
     a list, or text split at commas, semicolons, newlines and " and "), or ``auto`` (set for a list, numeric for
     a number, else exact). DeepAnalyze's data has no gold answer for datatasks (their judge compares the answer
     with ``ground_truth``), so this term only appears on rows that carry one.
  6. ``openresearch`` (data_source ``research``): report = mean of the open-domain judge's five dimensions / 5,
     code-success rate, turns = min(turns / 10, 1), combined with ``research_weights`` (default: the paper's
     Eq. 3, a third each).
  Without a judge (``judge: null`` or no ``base_url``) the judge terms are left out and the rest is averaged with
  the same weights; this is logged once. So qa = exact match, datatask = ½(answer + code) (answer alone without
  code steps, code alone without a gold answer), research = ½(code + turns). A datatask with no term at all (no
  judge, no gold answer, no code step) scores 0.0: it passed the format gate and nothing else can be measured.

Where we depart from DeepAnalyze's code and why:
  * Tags are read from the policy's text only. They concatenated assistant and execute contents, so a program that
    printed ``<Answer>42</Answer>`` could pass the format gate and plant the answer (the env also defangs tags in
    program output, `stagewise.envs.code_sandbox.defang_tags`).
  * The format gate wants complete pairs, not four substrings anywhere (``</Analyze><Analyze>`` passed theirs).
  * Code-success rate: the agent loop's own counts, where a timeout is an error (their timeout message lacked the
    colon of ``[Error]:`` and counted as a success) and a block that ran without printing is a success (theirs
    counted an empty observation as a failure). The term is left out when there was no code step, as in theirs.
  * A gold ``answer`` on a datatask row adds an answer term (their data has none, so their runs are unchanged).
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


def code_success_rate(calls: int, errors: int) -> Optional[float]:
    """Code steps without error / code steps; None (the term is left out) when there was no code step."""
    return None if calls <= 0 else max(0.0, (calls - errors) / calls)


ANSWER_MATCHES = ("auto", "exact", "numeric", "set")
_SPLIT_ITEMS = re.compile(r"\s*(?:[,;\n]|\band\b)\s*", re.IGNORECASE)
_ANY_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def _list_like(gold: Any) -> Optional[List[Any]]:
    """The items of a list-valued gold answer (a list, tuple, set or array, or a JSON list string), else None."""
    if isinstance(gold, str):
        t = gold.strip()
        if t.startswith("[") and t.endswith("]"):
            try:
                value = json.loads(t)
            except ValueError:
                return None
            return list(value) if isinstance(value, list) else None
        return None
    if isinstance(gold, (list, tuple, set, frozenset)) or (hasattr(gold, "tolist") and hasattr(gold, "__len__")):
        return list(gold.tolist() if hasattr(gold, "tolist") else gold)
    return None


def whole_number(text: str) -> Optional[float]:
    """The number the whole text is, once a leading currency sign, a trailing % or period and thousands
    separators are dropped; else None."""
    t = text.strip().rstrip(".").strip()
    t = re.sub(r"^[$€£¥]\s*", "", t)
    t = t[:-1].strip() if t.endswith("%") else t
    if _NUMBER.fullmatch(t) or re.fullmatch(r"[-+]?\.\d+", t):
        return float(t.replace(",", ""))
    return None


def parse_number(text: str) -> Optional[float]:
    """The one number a prediction states: `whole_number`, else the only number in the text; None when there is
    none or several."""
    value = whole_number(text)
    if value is not None:
        return value
    found = _ANY_NUMBER.findall(text)
    return float(found[0].replace(",", "")) if len(found) == 1 else None


def _item_key(item: Any) -> str:
    text = _normalize(str(item).strip().strip("'\"").strip())
    number = whole_number(text)
    return repr(number) if number is not None else text


def answer_items(text: Any) -> frozenset:
    """A set answer's items, normalised (numbers as numbers): a list, or text split at , ; newlines and " and "."""
    items = _list_like(text)
    if items is None:
        t = str(text).strip()
        if len(t) >= 2 and t[0] in "[({" and t[-1] in "])}":
            t = t[1:-1]
        items = [x for x in _SPLIT_ITEMS.split(t) if x.strip()]
    return frozenset(_item_key(x) for x in items if str(x).strip().strip("'\"").strip())


def answer_kind(gold: Any, kind: str = "auto") -> str:
    """``set`` for a list-valued gold answer, ``numeric`` for a number, else ``exact`` (when ``kind`` is auto)."""
    if kind != "auto":
        return kind
    if _list_like(gold) is not None:
        return "set"
    return "numeric" if whole_number(str(gold)) is not None else "exact"


def answer_matches(prediction: Optional[str], gold: Any, kind: str = "auto", rel_tol: float = 1e-6,
                   abs_tol: float = 1e-9) -> float:
    """1.0 when ``prediction`` matches the gold answer by ``kind`` (see the module docstring), else 0.0."""
    if kind not in ANSWER_MATCHES:
        raise ValueError(f"deepanalyze: answer_match must be one of {ANSWER_MATCHES}, got {kind!r}")
    if prediction is None or is_missing(gold):
        return 0.0
    kind = answer_kind(gold, kind)
    if kind == "set":
        expected = answer_items(gold)
        return float(bool(expected) and answer_items(prediction) == expected)
    if kind == "numeric":
        p, g = parse_number(prediction), whole_number(str(gold))
        return float(p is not None and g is not None and abs(p - g) <= max(abs_tol, rel_tol * abs(g)))
    return float(_normalize(prediction) == _normalize(str(gold)))


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
    ``api_key_env``, ``timeout_s``, ``max_retries``, ``concurrency``, ``temperature``,
    ``max_tokens``, ``system_prompt``), ``match`` (``exact`` | ``normalized``), ``research_weights``
    (``report``/``code``/``turns``), ``full_credit_turns`` (10), ``datatask_judge`` (the judge for datatask rows
    whose reward_spec names none).
    """

    def __init__(self, judge: Optional[Dict[str, Any]] = None, match: str = "exact",
                 research_weights: Optional[Dict[str, float]] = None, full_credit_turns: int = 10,
                 datatask_judge: str = ACCURACY_JUDGE, answer_match: str = "auto", answer_rel_tol: float = 1e-6,
                 answer_abs_tol: float = 1e-9):
        global _said_no_judge
        if match not in ("exact", "normalized"):
            raise ValueError(f"deepanalyze: match must be 'exact' or 'normalized', got {match!r}")
        if answer_match not in ANSWER_MATCHES:
            raise ValueError(f"deepanalyze: answer_match must be one of {ANSWER_MATCHES}, got {answer_match!r}")
        if not (answer_rel_tol >= 0 and answer_abs_tol >= 0):
            raise ValueError(f"deepanalyze: answer_rel_tol={answer_rel_tol} and answer_abs_tol={answer_abs_tol} "
                             "must be >= 0")
        self.answer_match = answer_match
        self.answer_rel_tol, self.answer_abs_tol = float(answer_rel_tol), float(answer_abs_tol)
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
                           "left out; qa = exact match, datatask = gold answer (where the row has one) + code-success rate, "
                           "research = code + turns")

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
            answer = self._gold_answer(row, spec)
            if answer is not None:
                kind = row.get("answer_match")
                kind = self.answer_match if is_missing(kind) else str(kind)
                terms["answer"] = answer_matches(last_answer(own), answer, kind, self.answer_rel_tol,
                                                 self.answer_abs_tol)
            if code is not None:
                terms["code"] = code
            return {**terms, "total": weighted_mean(terms) if terms else 0.0}
        # openresearch
        if self.judge is not None:
            dims = self._judge_terms(OPENDOMAIN_JUDGE, question, reference, completion, own)
            terms["report"] = sum(dims.values()) / len(dims)
        if code is not None:
            terms["code"] = code
        terms["turns"] = turns_reward(self._turns(completion, row), self.full_credit_turns)
        return {**terms, "total": weighted_mean(terms, self.research_weights)}

    @staticmethod
    def _gold_answer(row: Row, spec: Mapping[str, Any]) -> Any:
        """The row's gold answer (``answer`` column, else ``reward_spec.answer``), or None."""
        for value in (row.get("answer"), spec.get("answer")):
            if _list_like(value) is not None or not is_missing(value):
                return value
        return None

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


__all__ = ["DeepAnalyze", "answer_matches", "code_is_fenced", "code_success_rate", "exact_match", "format_ok",
           "last_answer", "parse_number", "strip_execute", "turns_reward", "weighted_mean"]
