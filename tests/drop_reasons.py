"""The drop reasons (and refusal codes) a product module can count, read from
its source, so a fuzzer's list of reasons to reach cannot drift from the code.

* ``counted(module)``: every ``<x>.drops[REASON] += ...`` in the module, with
  ``REASON`` a module constant, a string, or ``A if ... else B`` of those;
* ``returned(function)``: the reason constants a decoder returns;
* ``refusal_codes(module)``: the code of every ``RefusedError(text, "code")``.

A subscript by a variable (``drops[header]``, a decoder's answer) is skipped:
the decoder's own reasons come from ``returned``.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from types import FunctionType, ModuleType


def _strings(node: ast.expr, names: dict) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.Name) and isinstance(names.get(node.id), str):
        return {names[node.id]}
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        owner = names.get(node.value.id)
        value = getattr(owner, node.attr, None)
        return {value} if isinstance(value, str) else set()
    if isinstance(node, ast.IfExp):
        return _strings(node.body, names) | _strings(node.orelse, names)
    return set()


def counted(module: ModuleType, counter: str = "drops") -> set[str]:
    """Reasons the module adds to a ``.<counter>[...]`` Counter."""
    names = vars(module)
    found: set[str] = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if (isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Subscript)
                and isinstance(node.target.value, ast.Attribute) and node.target.value.attr == counter):
            found |= _strings(node.target.slice, names)
    return found


def returned(function: FunctionType) -> set[str]:
    """String constants ``function`` returns (a decoder's drop reasons)."""
    names = function.__globals__
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return {s for node in ast.walk(tree) if isinstance(node, ast.Return) and node.value is not None
            for s in _strings(node.value, names)}


def refusal_codes(module: ModuleType, error: str = "RefusedError") -> set[str]:
    """The codes of the ``error`` exceptions (``RefusedError(text, "code")``) the module raises."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == error
                and len(node.args) >= 2):
            found |= _strings(node.args[1], {})
    return found
