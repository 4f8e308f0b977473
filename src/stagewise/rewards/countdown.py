"""TinyZero's Countdown reward, evaluated without ``eval``.

Columns: ``nums`` (the given numbers) and ``target``. The equation is the content of the last
``<answer>...</answer>``. It is parsed with ``ast`` and only integer literals, ``+ - * /``, unary ``-``/``+`` and
parentheses are accepted; the value is computed with exact fractions by walking that tree.
"""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction
from typing import Any, List, Optional

from stagewise.rewards.base import Row, SampleReward

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_CHARS_RE = re.compile(r"[\d+\-*/().\s]+")  # TinyZero's character filter, kept as a first cheap check
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_OPERATOR_NODES = tuple(_BINOPS) + tuple(_UNARY)


def parse_equation(text: str) -> Optional[ast.expr]:
    """The expression tree if ``text`` is an arithmetic expression over integer literals with + - * / and
    parentheses, else None (``**``, ``//``, ``%``, ``=``, names, calls, decimals, empty text...)."""
    text = text.strip()
    if not text or not _CHARS_RE.fullmatch(text):
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    for node in ast.walk(tree.body):
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            continue
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            continue
        if isinstance(node, ast.Constant) and type(node.value) is int:
            continue
        if isinstance(node, _OPERATOR_NODES):
            continue
        return None
    return tree.body


def literals(tree: ast.expr) -> List[int]:
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)]


def evaluate(tree: ast.expr) -> Fraction:
    """Exact value of a tree accepted by ``parse_equation``; ZeroDivisionError on division by zero."""
    if isinstance(tree, ast.Constant):
        return Fraction(tree.value)
    if isinstance(tree, ast.UnaryOp):
        return _UNARY[type(tree.op)](evaluate(tree.operand))
    if isinstance(tree, ast.BinOp):
        return _BINOPS[type(tree.op)](evaluate(tree.left), evaluate(tree.right))
    raise TypeError(f"unexpected node {type(tree).__name__}")  # unreachable after parse_equation


class Countdown(SampleReward):
    """TinyZero ``compute_score``: ``score`` (1.0) if the last ``<answer>`` holds an expression that uses every
    given number exactly once and equals ``target``; ``format_score`` (0.1) if it holds a well-formed expression
    that is wrong (numbers missing, reused or extra; division by zero; another value); 0.0 otherwise.

    Departures from TinyZero, all documented choices:
    * Completions are scored alone, so there is no "Assistant:" marker to find and no last-line rule (TinyZero
      gives 0 when a newline follows ``</answer>``); the last complete ``<answer>`` anywhere counts (as rllm).
    * "Well-formed" means the grammar above. An empty answer, ``**``, ``//``, ``=``, words or decimals score 0.0;
      TinyZero gives 0.1 for those (it only checks a character class) and even 1.0 for a correct use of ``**``.
      Decimals such as ``1.5`` are not read as the numbers 1 and 5.
    * Exact arithmetic: the value must equal the target exactly (TinyZero: within 1e-5 in floats).
    """

    def __init__(self, format_score: float = 0.1, score: float = 1.0):
        self.format_score = float(format_score)
        self.score = float(score)

    def per_sample(self, completion: str, row: Row) -> float:
        nums, target = _task(row)
        answers = ANSWER_RE.findall(completion)
        if not answers:
            return 0.0
        tree = parse_equation(answers[-1])
        if tree is None:
            return 0.0
        if sorted(literals(tree)) != sorted(nums):
            return self.format_score
        try:
            value = evaluate(tree)
        except ZeroDivisionError:
            return self.format_score
        return self.score if value == target else self.format_score


def _task(row: Row) -> tuple:
    if "nums" not in row or "target" not in row:
        raise KeyError(f"countdown needs 'nums' and 'target' columns; got columns {sorted(row)}")
    nums: Any = row["nums"]
    return sorted(int(n) for n in nums), Fraction(str(row["target"]))
