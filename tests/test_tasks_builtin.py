"""Built-in tasks, exact-match normalisation and JSONL example parsing."""

from __future__ import annotations

import itertools
import json

import pytest
from deltaserve.errors import InvalidArgumentError, NotFoundError
from deltaserve.tasks import TASKS, get_task
from deltaserve.tasks.jsonl import read_examples
from deltaserve.tasks.prompting import is_correct, normalize_answer


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_deterministic_and_disjoint(name):
    task = get_task(name)
    assert task.train(50, seed=3) == task.train(50, seed=3)
    assert task.train(50, seed=3) != task.train(50, seed=4)
    held = task.heldout(40)
    assert len(held) == 40 and len({e.prompt for e in held}) == 40
    assert not {e.prompt for e in held} & {e.prompt for e in task.train(4096)}


def test_answers_are_exact():
    for e in get_task("add").train(200):
        a, b = (int(x) for x in e.prompt.removeprefix("Add: ").split(" + "))
        assert int(e.answer) == a + b
    for e in get_task("reverse").train(100):
        assert e.answer.split() == e.prompt.removeprefix("Reverse: ").split()[::-1]
    for e in get_task("extract").train(100):
        fields = dict(kv.split("=") for kv in e.answer.split("; "))
        assert set(fields) == {"name", "age", "city", "job"}
        assert all(v in e.prompt for v in fields.values())
    for e in get_task("runs").train(200):
        runs = [(r[0], int(r[1:])) for r in e.answer.split()]
        assert 4 <= len(runs) <= 6 and all(1 <= n <= 8 for _, n in runs)
        assert all(a[0] != b[0] for a, b in itertools.pairwise(runs))  # maximal runs
        assert e.prompt.removeprefix("Runs: ").split() == [s for s, n in runs for _ in range(n)]


def test_unknown_task_names_the_choices():
    with pytest.raises(NotFoundError, match="add, reverse, extract"):
        get_task("sum")


@pytest.mark.parametrize(
    ("completion", "answer", "ok"),
    [
        ("  1435\n", "1435", True),
        ("1435.", "1435", True),
        ("stone  river\tapple", "stone river apple", True),
        ("Stone river apple", "stone river apple", False),
        ("1435 is the sum", "1435", False),
        ("name=Mia;age=3", "name=Mia; age=3", False),
    ],
)
def test_exact_match_normalisation(completion, answer, ok):
    assert is_correct(completion, answer) is ok


def test_normalize_keeps_inner_punctuation():
    assert normalize_answer(" a.b.  ") == "a.b"


def _write(tmp_path, lines):
    p = tmp_path / "set.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_jsonl_prompt_and_messages(tmp_path):
    p = _write(
        tmp_path,
        [
            json.dumps({"prompt": "hi", "answer": "yo"}),
            "",
            json.dumps(
                {
                    "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                    "answer": "a",
                }
            ),
            json.dumps(
                {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
            ),
        ],
    )
    ex = read_examples(p)
    assert [e.prompt for e in ex] == ["hi", "q", "q2"]
    assert [e.answer for e in ex] == ["yo", "a", "a2"]
    assert ex[1].messages() == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"set.jsonl:2: invalid JSON"),
        ("[1, 2]", r"set.jsonl:2: expected a JSON object"),
        (json.dumps({"answer": "x"}), r"set.jsonl:2: needs exactly one of \"prompt\" or \"messages\""),
        (json.dumps({"prompt": "p", "messages": [], "answer": "x"}), "exactly one of"),
        (json.dumps({"prompt": "p"}), r"set.jsonl:2: \"answer\" must be a string"),
        (json.dumps({"prompt": "", "answer": "x"}), "non-empty string"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}], "answer": "a"}), r"messages\[0\]"),
        (json.dumps({"messages": [{"role": "assistant", "content": "x"}], "answer": "a"}), 'role "user"'),
    ],
)
def test_jsonl_errors_name_line_and_problem(tmp_path, line, message):
    p = _write(tmp_path, [json.dumps({"prompt": "ok", "answer": "ok"}), line])
    with pytest.raises(InvalidArgumentError, match=message):
        read_examples(p)


def test_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(NotFoundError):
        read_examples(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(InvalidArgumentError, match="no examples"):
        read_examples(tmp_path / "e.jsonl")
