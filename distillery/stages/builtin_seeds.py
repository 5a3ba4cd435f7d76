"""A built-in seed source: arithmetic word problems whose answers the program computes.

``make run`` needs seeds without any external data; these problems are generated from a
seeded random generator, so the same recipe gives the same problems everywhere.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

_NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena"]
_ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "shells", "cards"]


def _buy_and_give(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    start, bought = rng.randint(5, 60), rng.randint(2, 30)
    given = rng.randint(1, start + bought - 1)
    q = (
        f"{name} has {start} {item}. {name} buys {bought} more and then gives {given} to a friend. "
        f"How many {item} does {name} have now?"
    )
    return q, start + bought - given


def _price_total(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    count, price, paid_extra = rng.randint(2, 12), rng.randint(2, 15), rng.randint(0, 1)
    fee = rng.randint(1, 9) if paid_extra else 0
    fee_text = f" There is also a ${fee} delivery fee." if fee else ""
    q = f"{name} buys {count} packs of {item} at ${price} each.{fee_text} How many dollars does {name} spend in total?"
    return q, count * price + fee


def _share_equally(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 12)
    kept = rng.randint(0, 10)
    q = (
        f"{name} had some {item}, kept {kept} and shared the rest equally among {friends} friends. "
        f"Each friend got {each} {item}. How many {item} did {name} have at first?"
    )
    return q, friends * each + kept


def _speed_time(rng: random.Random) -> tuple[str, int]:
    name = rng.choice(_NAMES)
    speed, hours, extra = rng.randint(20, 70), rng.randint(2, 6), rng.randint(5, 40)
    q = (
        f"{name} drives at {speed} miles per hour for {hours} hours, then drives another {extra} miles. "
        f"How many miles does {name} drive in total?"
    )
    return q, speed * hours + extra


def _weekly_savings(rng: random.Random) -> tuple[str, int]:
    name = rng.choice(_NAMES)
    weekly, weeks, spent = rng.randint(3, 25), rng.randint(2, 10), rng.randint(1, 20)
    q = (
        f"{name} saves ${weekly} every week for {weeks} weeks and then spends ${spent} on a gift. "
        f"How many dollars does {name} have left?"
    )
    return q, weekly * weeks - spent


TEMPLATES: list[Callable[[random.Random], tuple[str, int]]] = [
    _buy_and_give,
    _price_total,
    _share_equally,
    _speed_time,
    _weekly_savings,
]


def _one_step(rng: random.Random) -> tuple[str, int]:
    """One addition or subtraction of two digits: what the embedded 135M model solves about 40% of
    the time (measured), so the samples of one problem are both right and wrong, which is what
    reward-model training and preference pairs need. Two-digit sums it almost never gets right."""
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", a + b
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", a - b


def _one_step_word(rng: random.Random) -> tuple[str, int]:
    """A word problem of one addition or subtraction with small numbers (``Ava has 7 shells and
    finds 5 more. How many shells does Ava have now?``): the default recipe's problems, a story
    for the chain of thought to retell, and one step the embedded 135M model can take."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        verb = rng.choice(["buys", "finds", "gets"])
        return f"{name} has {a} {item} and {verb} {b} more. How many {item} does {name} have now?", a + b
    a = rng.randint(3, 12)
    b = rng.randint(1, a - 1)
    verb = rng.choice(["gives away", "loses", "uses"])
    return f"{name} has {a} {item} and {verb} {b} of them. How many {item} does {name} have left?", a - b


def arithmetic_problems(count: int, *, seed: int = 0, kind: str = "arithmetic") -> Iterator[dict[str, str]]:
    """``count`` problems as seed rows with ``question`` and ``answer`` (the computed value).

    ``kind``: ``"arithmetic"`` (multi-step word problems), ``"one-step"`` (``What is 7 + 5?``) or
    ``"one-step-word"`` (one addition or subtraction told as a story).
    """
    rng = random.Random(seed)
    for i in range(count):
        if kind == "one-step":
            question, answer = _one_step(rng)
            yield {"id": f"step-{seed}-{i:06d}", "question": question, "answer": str(answer)}
        elif kind == "one-step-word":
            question, answer = _one_step_word(rng)
            yield {"id": f"word-{seed}-{i:06d}", "question": question, "answer": str(answer)}
        else:
            question, answer = TEMPLATES[i % len(TEMPLATES)](rng)
            yield {"id": f"arith-{seed}-{i:06d}", "question": question, "answer": str(answer)}
