"""The shape of the house: one rule for format width, no import circles, a small controller, docs true to the code."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import adaprec
from adaprec.controller import AdaptivePrecision, ControllerConfig
from adaprec.formats import get, names, wider, width_key

SRC = Path(adaprec.__file__).parent
DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_format_width_order_is_pinned_for_every_registered_format():
    """Policies, engine and ledger share this order: more bits is wider; at equal bits float above fixed point."""
    builtin = [
        "int2", "int3", "int4", "fp4_e2m1", "int5", "int6", "fp6_e3m2", "fp6_e2m3", "int8", "fp8_e5m2",
        "fp8_e4m3", "int12", "int14", "int16", "bf16", "fp16", "tf32", "fp32",
    ]
    ordered = sorted(names(), key=width_key)
    assert [n for n in ordered if n in builtin] == builtin
    # fixed-point widths made on demand by an earlier test (e.g. int7) rank by their bits among the rest
    for n in set(ordered) - set(builtin):
        assert n.startswith("int"), n
        bits = int(n[3:])
        assert all(int(m[3:]) < bits for m in ordered[: ordered.index(n)] if m.startswith("int") and m[3:].isdigit())
    assert wider("int8", "fp8_e4m3") == wider("fp8_e4m3", "int8") == "fp8_e4m3"
    assert wider("bf16", "fp16") == "fp16"


def test_every_width_rule_in_the_code_is_the_one_key():
    """No second copy of the ranking: nothing else sorts formats by (bits, ..., mbits)."""
    copies = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if path.name == "registry.py":
            continue
        if re.search(r"\(\s*\w+\.bits\s*,[^)]*\.mbits\s*\)", text):
            copies.append(str(path.relative_to(SRC)))
    assert copies == []


def test_width_key_takes_names_formats_and_recipes():
    from adaprec.plan import TensorRecipe

    assert width_key("bf16") == width_key(get("bf16")) == width_key(TensorRecipe("bf16"))


def _imports(node: ast.AST):
    """Every import statement under ``node``, at any depth, except inside ``if TYPE_CHECKING:`` blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _imports(child)


def _module_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the adaprec modules it imports, at any depth of the file (``TYPE_CHECKING`` blocks excluded).

    ``from package import submodule`` depends on the submodule, not on the package's ``__init__``.
    """
    mods: dict[str, Path] = {}
    for p in src.rglob("*.py"):
        parts = list(p.relative_to(src.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found: set[str] = set()
        for imp in _imports(ast.parse(path.read_text())):
            if isinstance(imp, ast.Import):
                found.update(resolve(a.name) for a in imp.names)
                continue
            base = imp.module or ""
            if imp.level:
                base = ".".join(package[: len(package) - (imp.level - 1)] + ([base] if base else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else resolve(base) for a in imp.names)
        graph[name] = {m for m in found if m.startswith("adaprec") and m != name}
    return graph


def test_the_project_has_no_import_circle():
    graph = _module_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    assert circles == []


def test_the_graph_sees_a_circle_when_there_is_one(tmp_path):
    """The check above can fail: two modules importing each other (one inside a function) are found."""
    pkg = tmp_path / "adaprec"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from adaprec.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from adaprec import a\n    return a\n")
    graph = _module_graph(pkg)
    assert "adaprec.b" in graph["adaprec.a"] and "adaprec.a" in graph["adaprec.b"]


def _lines(obj: object) -> int:
    source, _ = inspect.getsourcelines(obj)
    return len(source)


def test_the_controller_class_is_small_and_its_methods_short():
    assert _lines(AdaptivePrecision) < 300
    sizes = {}
    for name, attr in vars(AdaptivePrecision).items():
        fn = attr.fget if isinstance(attr, property) else attr
        if inspect.isfunction(fn):
            sizes[name] = _lines(fn)
    assert len(sizes) > 20  # the check reads the methods (context managers and properties too)
    assert {n: k for n, k in sizes.items() if k > 40} == {}


def _documented_signature() -> list[str]:
    text = (DOCS / "architecture.md").read_text()
    block = re.search(r"```python\n(AdaptivePrecision\(.*?\))\n```", text, re.S)
    assert block, "docs/architecture.md shows AdaptivePrecision's signature in a ```python block"
    params = block.group(1).split("(", 1)[1].rsplit(")", 1)[0]
    return [part.split("=")[0].strip() for part in params.split(",") if part.strip() not in ("*", "")]


def test_architecture_doc_shows_the_controllers_real_signature():
    real = [p for p in inspect.signature(AdaptivePrecision).parameters if p != "self"]
    assert _documented_signature() == real


@pytest.mark.parametrize("field", list(ControllerConfig.__dataclass_fields__))
def test_every_option_is_documented_where_it_lives(field):
    """Each option is described in ControllerConfig and named in AdaptivePrecision's docstring."""
    assert re.search(rf"^        (\w+, )*{field}(, \w+)*:", ControllerConfig.__doc__ or "", re.M)
    assert re.search(rf"\b{field}\b", AdaptivePrecision.__doc__ or "")
