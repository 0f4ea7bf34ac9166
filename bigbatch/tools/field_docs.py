"""The docstring written under each field of a dataclass: settings documented where they are declared.

A string literal on the line after `lr: float = 3e-3` in a dataclass body is
that field's documentation; `field_docs(OptimSection)["lr"]` returns it. It is
the one source for `bigbatch train --list-settings`, `--help` and docs/train.md's
table of settings. Python keeps no such string at run time, so it is read from
the class's source with `ast` (torchtitan's habit, without its dependency).

Limits: needs the source file (an installed package has it; a frozen
application may not: then every doc is empty, never an error).
"""

from __future__ import annotations

import ast
import inspect
import itertools
import textwrap

__all__ = ["field_docs"]

_CACHE: dict[type, dict[str, str]] = {}  # a class's source does not change while it is loaded


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal that follows its declaration in `cls`'s body.

    Args:
        cls: a class whose body declares annotated fields (a dataclass).

    Returns:
        The cleaned docstring of each documented field, in declaration order;
        fields without one are left out.

    Example:
        >>> from bigbatch.train.config import OptimSection
        >>> field_docs(OptimSection)["lr"].startswith("The peak learning rate")
        True
    """
    if cls in _CACHE:
        return _CACHE[cls]
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (frozen app, a class built at run time)
        return {}
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    _CACHE[cls] = docs
    return docs
