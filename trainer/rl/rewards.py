"""Rewards a program can check, scored as Ray tasks with a deadline.

A reward function is `fn(reply: str, answer, example: dict) -> float` (`example`: the prompt's whole .jsonl line).
Built in: `exact_match` (the reply's final answer equals the answer's text) and `numeric` (it equals the answer as
a number; both sides may be arithmetic expressions, evaluated by walking their syntax tree with bounded values,
never with `eval`). `--rl.reward module:function` (or `path/to/file.py:function`) names the user's own.

A reply whose function raises, runs past `rl.reward_timeout_s` or returns something other than a finite number
scores 0 and is counted (`reward_errors`, `reward_timeouts`, `reward_invalid`): the run goes on.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import math
import numbers
import operator
import re
import threading
import time
from typing import Callable

from raylm.errors import ConfigError

OK, ERROR, TIMEOUT, INVALID = "ok", "error", "timeout", "invalid"
COUNTED = {ERROR: "reward_errors", TIMEOUT: "reward_timeouts", INVALID: "reward_invalid"}


def final_answer(reply: str) -> str:
    """The part of a reply that states its answer: what follows the last `####` (GSM8K's mark) or `answer:`, else
    the last non-empty line."""
    for mark in ("####", "answer:"):
        at = reply.lower().rfind(mark)
        if at >= 0:
            return reply[at + len(mark):].strip()
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def exact_match(reply: str, answer, example: dict | None = None) -> float:
    return float(final_answer(reply) == str(answer).strip())


MAX_VALUE = 1e15
MAX_EXPONENT = 64
MAX_EXPRESSION = 200
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
             ast.USub: operator.neg, ast.UAdd: operator.pos}


def arithmetic(text: str) -> float | None:
    """The value of an arithmetic expression of numbers, + - * / // % ** and brackets (`1,234` reads as 1234), or
    None when the text is not one or leaves the bounds (|value| <= 1e15, exponents <= 64, 200 characters): a reply
    can never make the checker compute for long."""
    text = text.strip().rstrip(".").replace(",", "")
    if not text or len(text) > MAX_EXPRESSION:
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return None

    def value(node) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            result = node.value
        elif isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
            result = OPERATORS[type(node.op)](value(node.operand))
        elif isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or abs(left) > MAX_VALUE ** (1 / 2)):
                raise ArithmeticError("exponent out of bounds")
            result = OPERATORS[type(node.op)](left, right)
        else:
            raise ArithmeticError(f"not arithmetic: {type(node).__name__}")
        if isinstance(result, complex) or not math.isfinite(result) or abs(result) > MAX_VALUE:
            raise ArithmeticError("value out of bounds")
        return result

    try:
        return float(value(tree.body))
    except (ArithmeticError, ValueError, TypeError):  # ZeroDivisionError is an ArithmeticError
        return None


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def numeric(reply: str, answer, example: dict | None = None) -> float:
    """1 when the reply's final answer (as an expression, else its last number) equals the answer's value to a
    relative 1e-6."""
    expected = arithmetic(str(answer))
    if expected is None:
        return 0.0
    said = final_answer(reply)
    got = arithmetic(said)
    if got is None:
        numbers = NUMBER.findall(said)
        got = arithmetic(numbers[-1]) if numbers else None
    return float(got is not None and math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9))


BUILT_IN = {"exact_match": exact_match, "numeric": numeric}


def load_reward(spec: str) -> Callable:
    """The reward function `spec` names: a built-in, `module:function` or `path/to/file.py:function`."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise ConfigError(f"rl.reward={spec!r} is neither a built-in ({', '.join(BUILT_IN)}) nor module:function")
    try:
        if module_name.endswith(".py"):
            where = importlib.util.spec_from_file_location("raylm_user_reward", module_name)
            module = importlib.util.module_from_spec(where)
            where.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, OSError, SyntaxError) as exc:
        raise ConfigError(f"rl.reward={spec}: {module_name} cannot be imported ({exc}); give an importable module "
                          "or a .py file") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"rl.reward={spec}: {module_name} has no function {name}")
    return fn


def score_one(fn: Callable, reply: str, example: dict, timeout_s: float) -> tuple[float, str]:
    """(reward, status) of one reply: the function runs on a thread of its own, given up after `timeout_s` (a
    reply that hangs its checker scores 0, and the thread is left to end on its own)."""
    box: list = []

    def call():
        try:
            box.append((OK, fn(reply, example.get("answer"), example)))
        except Exception as exc:  # noqa: BLE001 - a user's reward that raises scores 0, counted
            box.append((ERROR, exc))

    thread = threading.Thread(target=call, daemon=True, name="raylm-reward")
    thread.start()
    thread.join(timeout_s)
    if not box:
        return 0.0, TIMEOUT
    status, value = box[0]
    if status == ERROR:
        return 0.0, ERROR
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        return 0.0, INVALID
    return float(value), OK


def score_replies(spec: str, replies: list[str], examples: list[dict], timeout_s: float) -> list[tuple[float, str]]:
    """The body of one reward task: a group's replies, each with its own deadline."""
    fn = load_reward(spec)
    return [score_one(fn, reply, example, timeout_s) for reply, example in zip(replies, examples)]


def score_groups(spec: str, groups: list[tuple[list[str], list[dict]]], *, timeout_s: float, cpus: float,
                 slack_s: float = 30.0) -> tuple[list[list[tuple[float, str]]], float]:
    """(scores of each group's replies, seconds) with one Ray task per group. A task still running when every
    reply of it could have hit its deadline (plus `slack_s` for the task's start) is cancelled, its replies scored 0
    as timed out: a checker stuck outside Python (where a thread cannot be given up on) costs the step a bounded
    wait, never the run."""
    import ray

    t0 = time.perf_counter()
    task = ray.remote(score_replies).options(num_cpus=cpus, max_retries=0, name="raylm-reward")
    refs = [task.remote(spec, replies, examples, timeout_s) for replies, examples in groups]
    longest = max((len(replies) for replies, _ in groups), default=0)
    ready, late = ray.wait(refs, num_returns=len(refs), timeout=longest * timeout_s + slack_s)
    for ref in late:
        ray.cancel(ref, force=True)
    late_set = set(late)
    scores = [[(0.0, TIMEOUT)] * len(replies) if ref in late_set else ray.get(ref)
              for ref, (replies, _) in zip(refs, groups)]
    return scores, time.perf_counter() - t0
