#!/usr/bin/env python3
"""Writes a small GSM8K-format sample: generated grade-school word problems
with numeric answers, in GSM8K's layout (`question`, and an `answer` whose
worked solution has `<<a*b=c>>` calculator annotations and ends with
`#### N`). Deterministic (fixed seed); standard library only.

    python3 scripts/gsm8k-sample.py examples/data/gsm8k-sample

writes train.jsonl (160 problems) and test.jsonl (40 problems).
"""

import json
import random
import sys
from pathlib import Path

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo",
         "Kemal", "Lena", "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "shells", "cards"]


def calc(a, op, b):
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return value, f"{a}{op}{b}={value}"


def buy(r):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    n, price, paid = r.randint(2, 9), r.randint(2, 12), None
    cost, c1 = calc(n, "*", price)
    paid = (cost // 10 + 1) * 10 + r.choice([0, 10, 20])
    change, c2 = calc(paid, "-", cost)
    q = (f"{name} buys {n} {item} that cost ${price} each. {name} pays with ${paid}. "
         f"How much change does {name} get?")
    a = (f"The {item} cost {n} * {price} = $<<{c1}>>{cost}.\n"
         f"The change is {paid} - {cost} = $<<{c2}>>{change}.\n#### {change}")
    return q, a


def share(r):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    friends = r.randint(2, 6)
    each = r.randint(3, 15)
    kept = r.randint(1, 9)
    total = friends * each + kept
    given, c1 = calc(total, "-", kept)
    per, c2 = calc(given, "/", friends)
    q = (f"{name} has {total} {item}. {name} keeps {kept} and shares the rest equally "
         f"among {friends} friends. How many {item} does each friend get?")
    a = (f"{name} shares {total} - {kept} = <<{c1}>>{given} {item}.\n"
         f"Each friend gets {given} / {friends} = <<{c2}>>{per} {item}.\n#### {per}")
    return q, a


def weeks(r):
    name = r.choice(NAMES)
    per_day = r.randint(2, 20)
    days = r.randint(2, 7)
    n_weeks = r.randint(2, 5)
    week, c1 = calc(per_day, "*", days)
    total, c2 = calc(week, "*", n_weeks)
    q = (f"{name} reads {per_day} pages a day, {days} days a week. "
         f"How many pages does {name} read in {n_weeks} weeks?")
    a = (f"In one week {name} reads {per_day} * {days} = <<{c1}>>{week} pages.\n"
         f"In {n_weeks} weeks {name} reads {week} * {n_weeks} = <<{c2}>>{total} pages.\n#### {total}")
    return q, a


def combine(r):
    a_name, b_name = r.sample(NAMES, 2)
    item = r.choice(ITEMS)
    x = r.randint(5, 60)
    more = r.randint(2, 30)
    y, c1 = calc(x, "+", more)
    total, c2 = calc(x, "+", y)
    q = (f"{a_name} has {x} {item}. {b_name} has {more} more {item} than {a_name}. "
         f"How many {item} do they have together?")
    a = (f"{b_name} has {x} + {more} = <<{c1}>>{y} {item}.\n"
         f"Together they have {x} + {y} = <<{c2}>>{total} {item}.\n#### {total}")
    return q, a


def half(r):
    name = r.choice(NAMES)
    start = 2 * r.randint(10, 80)
    spent, c1 = calc(start, "/", 2)
    earned = r.randint(3, 40)
    end, c2 = calc(spent, "+", earned)
    q = (f"{name} had ${start}. {name} spent half of it on a bike, then earned ${earned} "
         f"mowing lawns. How much money does {name} have now?")
    a = (f"After the bike {name} had {start} / 2 = $<<{c1}>>{spent}.\n"
         f"After mowing {name} has {spent} + {earned} = $<<{c2}>>{end}.\n#### {end}")
    return q, a


TEMPLATES = [buy, share, weeks, combine, half]


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/data/gsm8k-sample")
    out.mkdir(parents=True, exist_ok=True)
    r = random.Random(20261205)
    seen, rows = set(), []
    while len(rows) < 200:
        q, a = r.choice(TEMPLATES)(r)
        if q not in seen:
            seen.add(q)
            rows.append({"question": q, "answer": a})
    for name, part in [("train.jsonl", rows[:160]), ("test.jsonl", rows[160:])]:
        with open(out / name, "w") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")
        print(f"wrote {out / name} ({len(part)} problems)")


if __name__ == "__main__":
    main()
