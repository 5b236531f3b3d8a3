"""Generate the bundled sample corpus ``sample.jsonl``: small learnable prompt/completion tasks.

    python data/sample/make_sample.py            # rewrites data/sample/sample.jsonl (deterministic)

Tasks (5,000 lines, about 300 kB): two-number addition ("12 + 7 =" -> "19"), reversing a short
word ("reverse: stone" -> "enots"), and capital-city facts ("The capital of France is" -> "Paris.").
About one line in ten is a multi-turn article (a list of two or three pairs) so packing and
separators get exercised.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Australia": "Canberra",
    "Argentina": "Buenos Aires",
    "Cuba": "Havana",
}
WORDS = (
    "stone river cloud apple green light train paper music table water field night house bread "
    "glass tiger storm candle planet garden window silver forest winter bottle rocket shadow"
).split()


def pair(rng: random.Random) -> dict:
    task = rng.randrange(3)
    if task == 0:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return {"prompt": f"{a} + {b} =", "completion": str(a + b)}
    if task == 1:
        word = rng.choice(WORDS)
        return {"prompt": f"reverse: {word}", "completion": word[::-1]}
    country = rng.choice(sorted(CAPITALS))
    return {"prompt": f"The capital of {country} is", "completion": f"{CAPITALS[country]}."}


def main(path: Path | None = None, n: int = 5000, seed: int = 0) -> None:
    path = path or Path(__file__).with_name("sample.jsonl")
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            if rng.random() < 0.1:
                article = [pair(rng) for _ in range(rng.randint(2, 3))]
            else:
                article = pair(rng)
            f.write(json.dumps(article) + "\n")
    print(f"wrote {n} lines to {path}")


if __name__ == "__main__":
    main()
