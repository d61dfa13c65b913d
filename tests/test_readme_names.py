"""The README's names exist: every ``kernels.*`` / ``vit.*`` name, import and ``python -m`` module it shows.

Read from its code: inline code spans and ```python blocks (``from X import Y``, ``import X``,
dotted ``kernels.a.b`` / ``vit.a``), and every span or block for ``python -m module``. A dotted
name resolves as a reader would write it: ``import kernels`` (or ``vit``), then attribute by
attribute; only where a module has no such attribute may the next part be its submodule
(``vit.timm_weights``). So ``kernels.swap.TARGETS``, where ``kernels.swap`` is the swap
function, must be reachable from that function. Report blocks (plain ```) are output, not names.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import types
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)


def _code(readme: str) -> tuple[list[str], list[str]]:
    """(inline spans and python blocks, every span and block)."""
    blocks = FENCED.findall(readme)
    spans = [span for _, span in re.findall(r"(`+)(.+?)\1", FENCED.sub("", readme), flags=re.DOTALL)]
    return spans + [body for lang, body in blocks if lang == "python"], spans + [body for _, body in blocks]


PYTHON, EVERYTHING = _code(README)
DOTTED = sorted({m.group(0) for text in PYTHON for m in re.finditer(r"(?<![\w.])(?:kernels|vit)(?:\.[A-Za-z_]\w*)+", text)})
FROM_IMPORTS = sorted(
    {
        (module, name.split(" as ")[0].strip())
        for text in PYTHON
        for module, names in re.findall(r"^\s*from\s+([\w.]+)\s+import\s+\(?([\w\s,]+?)\)?\s*(?:#.*)?$", text, flags=re.MULTILINE)
        for name in names.split(",")
        if name.strip()
    }
)
IMPORTS = sorted({module for text in PYTHON for module in re.findall(r"^\s*import\s+([\w.]+)", text, flags=re.MULTILINE)})
RUN_MODULES = sorted({module for text in EVERYTHING for module in re.findall(r"python -m ([\w.]+)", text)})


def resolve(dotted: str) -> object:
    """``kernels.a.b`` as written after ``import kernels``; AttributeError naming the part that is missing."""
    first, *rest = dotted.split(".")
    obj = importlib.import_module(first)
    for part in rest:
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif isinstance(obj, types.ModuleType) and importlib.util.find_spec(f"{obj.__name__}.{part}") is not None:
            obj = importlib.import_module(f"{obj.__name__}.{part}")
        else:
            raise AttributeError(f"{dotted}: {type(obj).__name__} {getattr(obj, '__name__', obj)!r} has no {part!r}")
    return obj


def test_the_readme_has_names_to_check():
    # The patterns must find something, or every test below would pass on nothing.
    assert DOTTED and FROM_IMPORTS and IMPORTS and RUN_MODULES


@pytest.mark.parametrize("dotted", DOTTED)
def test_dotted_name_resolves(dotted):
    resolve(dotted)


@pytest.mark.parametrize(("module", "name"), FROM_IMPORTS, ids=[f"{m}.{n}" for m, n in FROM_IMPORTS])
def test_from_import_resolves(module, name):
    pytest.importorskip(module.split(".")[0])  # a third-party library the README imports from
    assert hasattr(importlib.import_module(module), name), f"from {module} import {name}"


@pytest.mark.parametrize("module", IMPORTS)
def test_import_resolves(module):
    pytest.importorskip(module.split(".")[0])
    importlib.import_module(module)


@pytest.mark.parametrize("module", RUN_MODULES)
def test_python_m_module_exists(module):
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"python -m {module}"
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        assert importlib.util.find_spec(f"{module}.__main__") is not None, f"python -m {module}: no __main__"


def test_resolve_refuses_what_is_not_there():
    # kernels.swap is the swap function, not the module: a name must hang on what the reader gets.
    with pytest.raises(AttributeError, match="has no 'NOT_THERE'"):
        resolve("kernels.swap.NOT_THERE")
    with pytest.raises(AttributeError, match="has no 'not_a_module'"):
        resolve("vit.not_a_module")
    assert resolve("vit.timm_weights").__name__ == "vit.timm_weights"  # a submodule, imported as written
