"""The house rules that keep spoa_mp/ readable, checked on its source.

No module over MAX_LINES lines (the codec wrapper, codec.py, excepted), no
function or method with more than MAX_PARAMETERS parameters
(self and cls not counted; *args, **kwargs and keyword-only ones are).
Also a script: `python tests/test_house.py` lists every offender, the
temporary exclusions below included.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "spoa_mp"
MAX_LINES = 500
MAX_PARAMETERS = 6
LONG_MODULES_ALLOWED = {"codec.py"}  # the codec wrapper


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def long_modules(allowed: set[str] = LONG_MODULES_ALLOWED) -> list[str]:
    """'path: N lines' of each module over MAX_LINES lines."""
    found = []
    for path in modules():
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and path.name not in allowed:
            found.append(f"{path.relative_to(PACKAGE.parent)}: {n} lines")
    return found


def parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> list[str]:
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    names += [f"*{a.vararg.arg}"] if a.vararg else []
    names += [f"**{a.kwarg.arg}"] if a.kwarg else []
    if names and names[0] in ("self", "cls"):  # a method's receiver
        names = names[1:]
    return names


def functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield node


def many_parameters() -> list[str]:
    """'path:line name(params)' of each function with more than MAX_PARAMETERS."""
    found = []
    for path in modules():
        for fn in functions(ast.parse(path.read_text(), str(path))):
            names = parameters(fn)
            if len(names) > MAX_PARAMETERS:
                name = getattr(fn, "name", "<lambda>")
                where = f"{path.relative_to(PACKAGE.parent)}:{fn.lineno}"
                found.append(f"{where} {name}({', '.join(names)})")
    return found


def test_no_module_over_500_lines_but_the_codec_wrapper() -> None:
    assert long_modules() == []


def test_no_function_with_more_than_6_parameters() -> None:
    assert many_parameters() == []


def test_the_parameter_check_sees_what_it_must() -> None:
    tree = ast.parse(
        "class C:\n"
        "    def m(self, a, b, /, c, *d, e, f, **g): pass\n"
        "def f(a, b, c, d, e, f): pass\n"
        "g = lambda a, b, c, d, e, f, h: 0\n"
    )
    counts = {getattr(fn, "name", "<lambda>"): len(parameters(fn)) for fn in functions(tree)}
    assert counts == {"m": 7, "f": 6, "<lambda>": 7}


if __name__ == "__main__":
    offenders = long_modules(set()) + many_parameters()
    print("\n".join(offenders) or "no offenders")
    sys.exit(1 if offenders else 0)
