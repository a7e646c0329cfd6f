"""Assertions that cannot fail, found mechanically in every test module (read with ast, nothing imported or run).

- `assert check(...) and x` where `check` is an `assert_*` function or anything from `np.testing` / `torch.testing`:
  those return None, so the `and` is false, or (under `or`) the assert ignores the check's result; call them as
  statements;
- `assert (x, "message")`: a non-empty tuple or list is always true (the message belongs after a comma, outside);
- `assert x == x` (or `is`, `<=`, `>=`, `in` ... between two copies of the same expression, anywhere in a chain):
  true whatever x is (a NaN aside, which is not what such a test means).
A planted example of each proves the checker finds it, so this test cannot pass by finding nothing.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# Comparisons that hold between an expression and itself; `!=`, `<`, `>` and `not in` fail instead, which a
# test means when it writes them.
ALWAYS_TRUE_ON_ITSELF = (ast.Eq, ast.Is, ast.LtE, ast.GtE)
NONE_RETURNING_MODULES = ("np.testing", "numpy.testing", "torch.testing", "testing")


def _returns_none(call: ast.Call) -> bool:
    """A call to a checker that raises or returns None: `assert_*` (unittest style, numpy, torch, polars) or any
    function of a `testing` module."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
    return name.startswith("assert_") or owner.endswith(NONE_RETURNING_MODULES)


def violations(source: str, filename: str = "<string>") -> list[str]:
    """`file:line: what` for each assertion of `source` that cannot fail."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Assert):
            continue
        test, where = node.test, f"{filename}:{node.lineno}"
        for boolop in (n for n in ast.walk(test) if isinstance(n, ast.BoolOp)):  # nested ones too
            for value in boolop.values:
                operand = value.operand if isinstance(value, ast.UnaryOp) else value  # `not assert_x(...)`
                if isinstance(operand, ast.Call) and _returns_none(operand):
                    found.append(f"{where}: {ast.unparse(operand.func)}() returns None inside "
                                 f"`{ast.unparse(boolop)}`")
        if isinstance(test, (ast.Tuple, ast.List)) and test.elts:
            found.append(f"{where}: assert on a non-empty {type(test).__name__.lower()} is always true")
        if isinstance(test, ast.Compare):
            operands = [test.left, *test.comparators]
            for op, left, right in zip(test.ops, operands, operands[1:]):
                if isinstance(op, ALWAYS_TRUE_ON_ITSELF) and ast.dump(left) == ast.dump(right):
                    found.append(f"{where}: `{ast.unparse(left)}` compared with itself")
    return found


PLANTED = {
    "assert_and": "import numpy as np\ndef test_x(a, b):\n    assert np.testing.assert_allclose(a, b) and a.ok\n",
    "assert_or": "def test_x(a, b):\n    assert a.ok or assert_frame_equal(a, b)\n",
    "not_assert": "import torch\ndef test_x(a, b):\n    assert not torch.testing.assert_close(a, b) and a\n",
    "nested": "import numpy as np\ndef test_x(a, b):\n    assert a.ok and (b.ok or np.testing.assert_equal(a, b))\n",
    "tuple": "def test_x(a):\n    assert (a > 0, 'a must be positive')\n",
    "list": "def test_x(a):\n    assert [a == 1]\n",
    "same": "def test_x(table):\n    assert table['docs'].sum() == table['docs'].sum()\n",
    "same_in_chain": "def test_x(a, b):\n    assert a == b <= b\n",
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_the_checker_finds_each_planted_violation(name):
    found = violations(PLANTED[name], name)
    assert len(found) == 1, found
    assert found[0].startswith(f"{name}:")


def test_the_checker_leaves_sound_assertions_alone():
    sound = ("import numpy as np\n"
             "def test_x(a, b):\n"
             "    np.testing.assert_allclose(a, b)\n"
             "    assert a.ok and b.ok, 'message'\n"
             "    assert a != a.copy() or np.isnan(a).any()\n"
             "    assert a < a + 1 and a == b\n"
             "    assert all(np.isfinite(x).all() for x in (a, b))\n"
             "    assert ()\n")  # fails: an empty tuple is false
    assert violations(sound) == []


def test_no_test_module_holds_an_assertion_that_cannot_fail():
    modules = sorted(TESTS.glob("*.py"))
    assert len(modules) > 10  # the scan did read the suite
    found = [v for path in modules for v in violations(path.read_text(), path.name)]
    assert found == []
