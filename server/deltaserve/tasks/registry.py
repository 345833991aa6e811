"""The built-in tasks. Each has an exact answer the base model does not produce.

- `add`: three-digit addition ("Add: 482 + 937" -> "1419").
- `reverse`: reverse a list of words ("Reverse: apple river stone" -> "stone river apple").
- `extract`: a sentence about a person -> a fixed key=value record
  ("name=Maria; age=34; city=Oslo; job=baker").
- `runs`: run-length encoding of repeated symbols ("Runs: o o o x x o" -> "o3 x2 o1"), the hard
  class for 1-bit deltas: every answer token depends on exact copying and counting of
  identical neighbouring tokens, so a small error in the delta shifts a count.
"""

from __future__ import annotations

import random

from deltaserve.errors import NotFoundError
from deltaserve.tasks.base import Example, Task

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lamp",
    "garden",
    "silver",
    "window",
    "pepper",
    "rocket",
    "forest",
    "candle",
    "mirror",
    "violin",
    "desert",
    "harbor",
    "pencil",
    "castle",
    "orange",
    "bridge",
    "winter",
    "meadow",
    "copper",
    "falcon",
]
NAMES = [
    "Maria",
    "Tom",
    "Aiko",
    "Omar",
    "Lena",
    "Paulo",
    "Sara",
    "Ivan",
    "Nora",
    "Kofi",
    "Elena",
    "Raj",
    "Mia",
    "Hugo",
    "Zara",
    "Yuki",
]
CITIES = [
    "Oslo",
    "Lima",
    "Cairo",
    "Perth",
    "Quito",
    "Porto",
    "Accra",
    "Dublin",
    "Hanoi",
    "Riga",
    "Kyoto",
    "Tunis",
    "Bern",
    "Lyon",
]
JOBS = ["baker", "pilot", "nurse", "farmer", "teacher", "painter", "chemist", "tailor", "plumber", "sailor"]
TEMPLATES = (
    "{name}, {age}, lives in {city} and works as a {job}.",
    "Meet {name}: a {job} from {city}, aged {age}.",
    "{name} is a {age}-year-old {job} based in {city}.",
    "In {city} lives {name}, a {job} who is {age} years old.",
)


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return Example(prompt=f"Add: {a} + {b}", answer=str(a + b))


def _reverse(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return Example(prompt="Reverse: " + " ".join(words), answer=" ".join(reversed(words)))


def _extract(rng: random.Random) -> Example:
    fields = dict(
        name=rng.choice(NAMES), age=rng.randint(19, 79), city=rng.choice(CITIES), job=rng.choice(JOBS)
    )
    sentence = rng.choice(TEMPLATES).format(**fields)
    answer = "name={name}; age={age}; city={city}; job={job}".format(**fields)
    return Example(prompt="Extract: " + sentence, answer=answer)


RUN_SYMBOLS = ["o", "x", "k", "z"]


def _runs(rng: random.Random) -> Example:
    runs: list[tuple[str, int]] = []
    for _ in range(rng.randint(4, 6)):
        symbol = rng.choice([s for s in RUN_SYMBOLS if not runs or s != runs[-1][0]])
        runs.append((symbol, rng.randint(1, 8)))
    prompt = " ".join(" ".join([s] * n) for s, n in runs)
    return Example(prompt="Runs: " + prompt, answer=" ".join(f"{s}{n}" for s, n in runs))


TASKS: dict[str, Task] = {
    "add": Task("add", "three-digit addition, answer is the number", _add),
    "reverse": Task("reverse", "reverse the order of 3-5 words", _reverse),
    "extract": Task("extract", "person sentence -> 'name=..; age=..; city=..; job=..'", _extract),
    "runs": Task("runs", "run-length encoding of 4-6 runs of 1-8 symbols ('o o x' -> 'o2 x1')", _runs),
}


def get_task(name: str) -> Task:
    """The built-in task `name`; NotFoundError lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise NotFoundError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}") from None
