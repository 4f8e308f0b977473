"""Math answer rewards: ``accuracy`` (open-r1, math-verify), ``boxed_math`` (DeepScaleR), ``answer_tag``
(DeepScaleR's <answer> tags).

Decisions on the points where open-r1, DeepScaleR and the R1-Zero tutorial disagree:

* Unparseable gold: ``None`` for every function here ("cannot be scored", left out of the weighted sum),
  as open-r1 does today. A gold that is a non-numeric string is *not* unparseable for ``answer_tag``: it is
  compared as a string.
* Where the answer is read: ``accuracy`` lets math-verify search the whole completion (``\\boxed{}`` first,
  then "the answer is $...$"-style anchors); ``boxed_math`` reads the last ``\\boxed{}`` after ``</think>``;
  ``answer_tag`` reads the last ``<answer>...</answer>``. Several boxed answers in ``accuracy`` follow the
  installed math-verify (0.9: different values become a set and fail, so hedging is not rewarded).
* Binary scores: 1.0 correct / 0.0 otherwise, which is what DeepScaleR actually trained with (its -1
  constants never reached the trainer); ``answer_tag`` adds a documented partial credit when the tag is missing.

Gold answers come from the ``answer`` column when it has a value, else ``solution`` (see ``base.gold_of``); a list
of golds means any may match.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from fractions import Fraction
from typing import List, Optional

from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
from math_verify import LatexExtractionConfig, parse, verify

from stagewise.rewards.base import GOLD_COLUMNS, RewardTimeout, Row, SampleReward, gold_of, gold_texts

# --------------------------------------------------------------------------------------------------- helpers
THINK_CLOSE = "</think>"
ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _mv_timeout(seconds: int = 5) -> Optional[int]:
    """math-verify times out with SIGALRM, which only works in the main thread; elsewhere the runner's process pool
    (or the caller) is the time limit."""
    return seconds if _in_main_thread() else None


@contextlib.contextmanager
def time_limit(seconds: Optional[float], what: str):
    """Raise RewardTimeout after ``seconds`` (main thread only; a no-op elsewhere, where the pool's hard kill is the
    limit). Never use this from worker threads: signals are delivered to the main thread only."""
    if not seconds or seconds <= 0 or not _in_main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _raise(signum, frame):
        raise RewardTimeout(f"{what} took longer than {seconds}s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def last_boxed(text: str) -> Optional[str]:
    r"""Content of the last ``\boxed{...}`` / ``\fbox{...}`` (braces matched), or of ``\boxed 5`` (up to a space
    or ``$``). Departs from DeepScaleR, which finds ``\fbox`` but then drops it: here both forms count."""
    starts = [(text.rfind(cmd), cmd) for cmd in ("\\boxed", "\\fbox")]
    start, cmd = max(starts)
    if start < 0:
        return None
    i = start + len(cmd)
    if i < len(text) and text[i] == " ":
        m = re.match(r" +([^\s$]+)", text[i:])
        return m.group(1) if m else None
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


# -------------------------------------------------------------------------------------------------- accuracy
# open-r1's answer extraction: LaTeX only, boxed first, no anchor-less extraction (so a bare "4" or "$4$" with
# no "answer is" phrase yields nothing). equations=True is dropped: math-verify 0.9 handles equations itself.
ANSWER_EXTRACTION = [
    LatexExtractionConfig(
        normalization_config=NormalizationConfig(
            nits=False, malformed_operators=False, basic_latex=True, boxed="all", units=True),
        boxed_match_priority=0,
        try_extract_without_anchor=False,
    )
]


def parse_gold(gold: str) -> list:
    r"""math-verify's default extraction (LaTeX and plain expressions), first match. A bare LaTeX answer with no
    delimiters (DeepScaleR's ``answer`` column, e.g. ``2\sqrt{3}``) is wrapped in ``$...$`` first; without this,
    math-verify reads ``2\sqrt{3}`` as ``2`` and ``\frac12`` as nothing."""
    text = str(gold).strip()
    if "\\" in text and not any(d in text for d in ("$", "\\boxed", "\\(", "\\[")):
        text = f"${text}$"
    return parse(text, extraction_mode="first_match", parsing_timeout=_mv_timeout())


def is_correct(completion: str, golds: List[str]) -> Optional[bool]:
    """open-r1 correctness: ``verify(gold, answer)``; None when no gold parses."""
    parsed = [g for g in (parse_gold(t) for t in golds) if g]
    if not parsed:
        return None
    answer = parse(completion, extraction_config=ANSWER_EXTRACTION, extraction_mode="first_match",
                   parsing_timeout=_mv_timeout())
    return any(verify(g, answer, timeout_seconds=_mv_timeout()) for g in parsed)


class Accuracy(SampleReward):
    r"""open-r1 ``accuracy_reward``: 1.0 if math-verify finds the gold in the completion, else 0.0.

    * Gold: ``answer`` or ``solution``, parsed with math-verify's default configs (a bare ``4`` and a worked
      solution ending in ``$\boxed{4}$`` both parse; bare LaTeX is wrapped in ``$`` first, see ``parse_gold``).
      Unparseable gold -> None (the tutorial gives 0.5 and pre-April-2025 open-r1 gives 1.0; both reward noise).
    * Answer: LaTeX from ``\boxed{}`` or after an answer anchor, anywhere in the text (think tags are irrelevant);
      empty completion -> 0.0; ``\boxed{x=2}`` matches gold 2.
    * Runs in the worker pool (``executor = "process"``): parsing can hang on adversarial LaTeX.
    """

    executor = "process"
    reads = GOLD_COLUMNS

    def per_sample(self, completion: str, row: Row) -> Optional[float]:
        correct = is_correct(completion, gold_texts(gold_of(row, "accuracy")))
        return None if correct is None else float(correct)


# ------------------------------------------------------------------------------------- MATH normalisation
def _fix_fracs(s: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac1b`` -> ``\frac{1}{b}``, ``\frac1{2}`` -> ``\frac{1}{2}``."""
    s = re.sub(r"\\frac(\w)(\w)", r"\\frac{\1}{\2}", s)
    return re.sub(r"\\frac(\w)\{", r"\\frac{\1}{", s)


def _fix_a_slash_b(s: str) -> str:
    """``3/4`` -> ``\\frac{3}{4}`` when both sides are plain integers (as the MATH dataset writes them)."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def normalize_math(answer: str) -> str:
    r"""Hendrycks MATH ``strip_string`` (as used by DeepScaleR's ``grade_answer_mathd``), in its order: unwrap a
    whole ``\text{...}``; drop newlines and ``\!``; ``\\`` -> ``\``; tfrac/dfrac -> frac; drop ``\left``/
    ``\right``, degrees, ``\$``, units after ``\text{ ``, ``\%``; " ." -> " 0."; leading "." -> "0."; "k = v" with
    a short left side -> v; ``\sqrt3`` -> ``\sqrt{3}``; remove spaces; ``\frac12`` -> ``\frac{1}{2}``;
    "0.5" -> ``\frac{1}{2}``; integer "a/b" -> ``\frac{a}{b}``. (The original asserts exactly one ``\text{ ``;
    we cut at the first.)"""
    s = str(answer).strip()
    m = re.fullmatch(r"\\text\{(.+?)\}", s)
    if m:
        s = m.group(1)
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    s = s.split("\\text{ ")[0]
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0]) <= 2:
        s = parts[1]
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


# ----------------------------------------------------------------------------------- sympy equivalence
_UNIT_WORDS = ["degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week", "month",
               "year", "foot", "feet", "inch", "yard"]
_THOUSANDS_INT = re.compile(r"-?\d{1,3}(?:,\d{3})+")


def _strip_thousands(s: str) -> str:
    return s.replace(",", "") if _THOUSANDS_INT.fullmatch(s) else s


def normalize_for_sympy(expr: str) -> str:
    r"""DeepScaleR's ``_normalize`` (PRM800K grader) up to its LaTeX-to-text step: unwrap ``\text{}``; drop ``$``
    and ``%``; " or "/" and " -> ","; million/billion/trillion -> ``*10^k``; strip unit words and degrees; strip
    one pair of outer braces and ``,\!``; integral floats -> int; ``- `` -> ``-``; "7 3/4" -> "7+3/4"; remove
    spaces; "1,000" -> "1000". Departure: DeepScaleR converts LaTeX to text with pylatexenc, then lowercases and
    drops every brace; we keep the LaTeX and let latex2sympy2 (already a math-verify dependency) parse it."""
    m = re.search(r"^\\text\{(?P<text>.+?)\}$", expr)
    if m:
        expr = m.group("text")
    expr = expr.replace("\\%", "").replace("\\$", "").replace("$", "").replace("%", "")
    expr = expr.replace(" or ", " , ").replace(" and ", " , ")
    expr = expr.replace("million", "*10^6").replace("billion", "*10^9").replace("trillion", "*10^12")
    for unit in _UNIT_WORDS:
        expr = re.sub(rf"{unit}(es)?(s)? *(\^[0-9]+)?", "", expr)
    expr = re.sub(r"\^ *\\circ", "", expr)
    expr = expr.strip()
    if len(expr) > 1 and expr[0] == "{" and expr[-1] == "}":
        expr = expr[1:-1]
    expr = re.sub(r",\\! *", "", expr)
    try:
        value = float(expr)
        if value.is_integer() and abs(value) < 1e15:
            expr = str(int(value))
    except ValueError:
        pass
    expr = re.sub(r"- *", "-", expr)
    expr = re.sub(r"([0-9]) +([0-9]+/[0-9]+)", r"\1+\2", expr)
    expr = expr.replace(" ", "")
    return _strip_thousands(expr)


def split_tuple(expr: str) -> List[str]:
    """``(1,2)`` / ``[a,b)`` -> elements, when the brackets are only at the ends; anything else is one element."""
    expr = _strip_thousands(expr)
    if not expr:
        return []
    brackets = "()[]"
    if (len(expr) > 2 and expr[0] in brackets and expr[-1] in brackets
            and not any(ch in expr[1:-1] for ch in brackets)):
        return [e.strip() for e in expr[1:-1].split(",")]
    return [expr]


_FRAC_LATEX = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}")
_FRAC_PLAIN = re.compile(r"-?\d+/\d+")


def _plain_fraction(expr: str) -> Optional[str]:
    """``a/b`` for a fraction of two integers written either way, else None."""
    if _FRAC_PLAIN.fullmatch(expr):
        return expr
    m = _FRAC_LATEX.fullmatch(expr)
    if m:
        return f"{m.group(1)}{m.group(2)}/{m.group(3)}".replace("--", "")
    return None


def _is_int(expr: str) -> bool:
    try:
        value = float(_strip_thousands(expr))
    except (ValueError, OverflowError):
        return False
    return abs(value - round(value)) <= 1e-7


def _allow_sympy(expr: str) -> bool:
    """DeepScaleR's guard against hopeless or explosive inputs: at most two unknown letters (LaTeX commands,
    ``sqrt`` and ``frac`` excluded), no exponent towers or exponents of two or more digits."""
    flat = re.sub(r"\\[A-Za-z]+", "", expr).replace("{", "").replace("}", "")
    if len({c for c in flat if c.isalpha()}) > 2:
        return False
    return not (re.search(r"\^[0-9]+\^", flat) or re.search(r"\^[0-9][0-9]+", flat) or "^(" in flat)


def sympy_equal(gold: str, given: str, timeout_s: Optional[float]) -> bool:
    """``simplify(gold - given) == 0`` on latex2sympy2 parses; a parse failure is "not equal". Exceeding
    ``timeout_s`` raises RewardTimeout (the sample then scores None and is counted as an error)."""
    if not _allow_sympy(f"({gold})-({given})"):
        return False
    import sympy
    from latex2sympy2_extended import latex2sympy

    with time_limit(timeout_s, "sympy equivalence"):
        try:
            diff = latex2sympy(gold) - latex2sympy(given)
            return bool(sympy.simplify(diff) == 0)
        except Exception:
            return False


def grade_answer(given: str, gold: str, timeout_s: Optional[float] = 2.0) -> bool:
    """DeepScaleR's grader: MATH-normalised strings equal, else element-wise sympy equivalence with its rules
    (tuple brackets and sizes must match; two plain fractions must be identical, so 2/4 != 1/2; an integer gold
    needs an integer answer; no numeric tolerance, so 3.14 != pi)."""
    if normalize_math(given) == normalize_math(gold):
        return True
    gold_n, given_n = normalize_for_sympy(gold), normalize_for_sympy(given)
    if not gold_n or not given_n:
        return False
    if gold_n.lower() == given_n.lower():
        return True
    gold_elems, given_elems = split_tuple(gold_n), split_tuple(given_n)
    if len(gold_elems) > 1 and (gold_n[0] != given_n[0] or gold_n[-1] != given_n[-1]):
        return False
    if len(gold_elems) != len(given_elems):
        return False
    for g, a in zip(gold_elems, given_elems):
        g_frac, a_frac = _plain_fraction(g), _plain_fraction(a)
        if g_frac is not None and a_frac is not None:
            ok = g_frac == a_frac
        elif _is_int(g) != _is_int(a):
            ok = False
        else:
            ok = sympy_equal(g, a, timeout_s)
        if not ok:
            return False
    return True


def _unbox_gold(text: str) -> Optional[str]:
    if "\\boxed" in text or "\\fbox" in text:
        return last_boxed(text)
    return text.strip() or None


class BoxedMath(SampleReward):
    r"""DeepScaleR's math reward: 1.0 if the last ``\boxed{}`` after ``</think>`` equals the gold, else 0.0.

    * ``</think>`` must be present (no closing tag -> 0.0); the answer region is everything after the first one.
      Departure: DeepScaleR also requires ``<think>``; we do not, because chat templates that pre-fill
      ``<think>`` in the prompt (R1 distills, Qwen3) leave it out of the completion (rllm dropped it too).
    * Answer: last ``\boxed{...}``, ``\boxed 5`` or ``\fbox{...}`` (DeepScaleR drops ``\fbox``); none -> 0.0.
    * Gold: ``answer`` (or ``solution``); a gold containing ``\boxed`` is unwrapped; a list means any matches;
      no usable gold -> None.
    * Grading: ``grade_answer`` (MATH normalisation, then sympy). Sympy runs under ``sympy_timeout_s`` (2 s, rllm's
      default); a timeout makes the sample None and counts as an error (DeepScaleR/rllm call it wrong) so that
      hangs are visible in ``rewards/boxed_math/errors``. Scores are binary, as DeepScaleR trained.
    """

    executor = "process"
    reads = GOLD_COLUMNS

    def __init__(self, sympy_timeout_s: float = 2.0):
        self.sympy_timeout_s = float(sympy_timeout_s)

    def per_sample(self, completion: str, row: Row) -> Optional[float]:
        golds = [g for g in (_unbox_gold(t) for t in gold_texts(gold_of(row, "boxed_math"))) if g]
        if not golds:
            return None
        if THINK_CLOSE not in completion:
            return 0.0
        answer = last_boxed(completion.split(THINK_CLOSE, 1)[1])
        if answer is None or not answer.strip():
            return 0.0
        return float(any(grade_answer(answer, g, self.sympy_timeout_s) for g in golds))


# ------------------------------------------------------------------------------------------------ answer tag
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_RE = re.compile(rf"[+-]?(?:{_NUM})")
_FRACTION_RE = re.compile(rf"([+-]?(?:{_NUM}))\s*/\s*([+-]?(?:{_NUM}))")
_LATEX_FRAC_RE = re.compile(rf"([+-]?)\\[dt]?frac\{{\s*([+-]?(?:{_NUM}))\s*\}}\{{\s*([+-]?(?:{_NUM}))\s*\}}")
_ANY_NUMBER_RE = re.compile(rf"[+-]?\\[dt]?frac\{{[^{{}}]*\}}\{{[^{{}}]*\}}|{_FRACTION_RE.pattern}|[+-]?(?:{_NUM})")


def _clean(text: str) -> str:
    s = str(text).strip().replace("\u2212", "-")
    boxed = last_boxed(s) if s.startswith(("\\boxed", "\\fbox")) else None
    s = boxed if boxed is not None else s
    s = s.replace("$", "").replace("\\left", "").replace("\\right", "").replace("\\!", "").strip()
    return s.rstrip(".").strip()


def _number(token: str) -> Fraction:
    return Fraction(token.replace(",", ""))


def parse_number(text: str) -> Optional[Fraction]:
    r"""An exact number from ``18``, ``-2``, ``+3``, ``1,234``, ``3.14``, ``.5``, ``-2/3``, ``\frac{2}{3}``,
    ``-\dfrac{1}{2}`` (with optional ``$``, a wrapping ``\boxed{}`` and a trailing period). Thousands separators
    must be well formed (``1,23`` is not a number). Zero denominators and anything else -> None."""
    s = _clean(text)
    try:
        if _NUMBER_RE.fullmatch(s):
            return _number(s)
        m = _FRACTION_RE.fullmatch(s)
        if m:
            return _number(m.group(1)) / _number(m.group(2))
        m = _LATEX_FRAC_RE.fullmatch(s)
        if m:
            value = _number(m.group(2)) / _number(m.group(3))
            return -value if m.group(1) == "-" else value
    except ZeroDivisionError:
        return None
    return None


def _answers_match(answer: str, gold: str) -> bool:
    gold_value = parse_number(gold)
    if gold_value is not None:
        return parse_number(answer) == gold_value
    squash = lambda s: re.sub(r"\s+", "", _clean(s)).replace("dfrac", "frac").replace("tfrac", "frac")  # noqa: E731
    return squash(answer) == squash(gold) != ""


class AnswerTag(SampleReward):
    r"""The DeepScaleR GRPO recipe's answer-tag reward (verl): exact numeric match of the last ``<answer>...</answer>``.

    * Answer: the last complete ``<answer>...</answer>`` (an unclosed tag does not count); numbers may carry a
      sign, thousands separators, decimals, or be fractions (``-2/3``, ``\frac{2}{3}``); see ``parse_number``.
      Comparison is exact rational arithmetic (``0.5`` == ``1/2`` == ``\frac{1}{2}``; ``3.14`` != ``\pi``).
    * Gold: ``answer`` (or ``solution``; a ``\boxed{}`` in it is unwrapped). A non-numeric gold (``2\sqrt{3}``)
      is compared as a string with whitespace and ``$`` removed; use ``boxed_math`` for symbolic answers.
      Missing gold -> None.
    * No tag (the recipe's "fall back to default scoring"): the answer is read instead from the last ``\boxed{}``,
      else the last number in the text; a match scores ``fallback_score`` (0.5: a right answer still beats a
      wrong one, but the tag is worth learning), a miss ``wrong_score``.
    """

    def __init__(self, correct_score: float = 1.0, wrong_score: float = 0.0, fallback_score: float = 0.5):
        self.correct_score = float(correct_score)
        self.wrong_score = float(wrong_score)
        self.fallback_score = float(fallback_score)

    def per_sample(self, completion: str, row: Row) -> Optional[float]:
        golds = [g for g in (_unbox_gold(t) for t in gold_texts(gold_of(row, "answer_tag"))) if g]
        if not golds:
            return None
        tags = ANSWER_TAG_RE.findall(completion)
        if tags:
            answer, reward = tags[-1], self.correct_score
        else:
            answer, reward = self._fallback_answer(completion), self.fallback_score
            if answer is None:
                return self.wrong_score
        return reward if any(_answers_match(answer, g) for g in golds) else self.wrong_score

    @staticmethod
    def _fallback_answer(completion: str) -> Optional[str]:
        boxed = last_boxed(completion)
        if boxed is not None:
            return boxed
        numbers = [m.group(0) for m in _ANY_NUMBER_RE.finditer(completion)]
        return numbers[-1] if numbers else None
