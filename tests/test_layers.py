"""The layers hold, read from the source: every import (lazy ones inside functions, TYPE_CHECKING ones and the
lazy re-export maps included) of each module, checked against the rule of its layer.

- `concept_db` imports nothing from `mmpersona`, `pipelines` or the application layer;
- the core (every module of `mmpersona` outside the application layer and the facade) imports nothing from
  `pipelines` or the application layer;
- `pipelines` imports nothing from the application layer;
- the application layer (`mmpersona.cli`, `mmpersona.server`, `mmpersona.app`, `mmpersona.demo`,
  `mmpersona.__main__`, `gradio_app.py`) may import anything.

The facade `mmpersona/__init__.py` re-exports pipelines lazily, so a name imported from it counts as an import
of the module that defines it (`from mmpersona import PersonalizedVLMPipeline` is an import of `pipelines.vlm`).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmpersona", "concept_db", "pipelines")
APPLICATION = ("mmpersona.cli", "mmpersona.server", "mmpersona.app", "mmpersona.demo", "mmpersona.__main__",
               "gradio_app")
FORBIDDEN = {"concept_db": {"core", "facade", "pipelines", "application"},
             "core": {"pipelines", "application"},
             "pipelines": {"application"}}


def _within(module: str, roots) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


def layer(module: str) -> str | None:
    if _within(module, APPLICATION):
        return "application"
    if module == "mmpersona":
        return "facade"
    for package, name in (("mmpersona", "core"), ("pipelines", "pipelines"), ("concept_db", "concept_db")):
        if _within(module, (package,)):
            return name
    return None  # the standard library or a third-party package


def module_of(path: Path) -> tuple[str, str]:
    """(the module's name, the package its relative imports start from)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def lazy_exports(tree: ast.Module) -> dict[str, str]:
    """A module's `_EXPORTS = {name: module}` map (the lazily re-exported names), if it has one."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            return {k.value: v.value for k, v in zip(node.value.keys, node.value.values, strict=True)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
    return {}


def _source_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _resolve(module: str, name: str) -> str:
    """What `from module import name` imports: a submodule, a lazily re-exported name's own module, or the
    module itself."""
    if _source_file(f"{module}.{name}") is not None:
        return f"{module}.{name}"
    init = _source_file(module)
    if init is not None and init.name == "__init__.py":
        exported = lazy_exports(ast.parse(init.read_text(encoding="utf-8")))
        if name in exported:
            return exported[name]
    return module


def imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"))
    _, package = module_of(path)
    found = [(0, target) for target in lazy_exports(tree).values()]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found += [(node.lineno, _resolve(module, alias.name)) for alias in node.names]
    return found


def violations_in(path: Path, source: str | None = None) -> list[str]:
    name, _ = module_of(path)
    forbidden = FORBIDDEN.get(layer(name) or "", set())
    return [f"{path.relative_to(ROOT)}:{line} ({layer(name)}) imports {target} ({layer(target)})"
            for line, target in imports(path, source) if layer(target) in forbidden]


def checked_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py")) + [ROOT / "gradio_app.py"]


def test_every_module_keeps_to_its_layer():
    files = checked_files()
    assert len(files) > 80 and all(layer(module_of(p)[0]) for p in files)
    violations = [v for path in files for v in violations_in(path)]
    assert not violations, "imports across the layers:\n" + "\n".join(violations)


def test_the_rule_sees_every_kind_of_import():
    loaders = ROOT / "mmpersona/models/loaders.py"
    # what loaders.py did before the token manager moved into the core: a lazy import inside a property
    lazy = "class LoadedVLM:\n    @property\n    def tokens(self):\n        from pipelines.tokens import TokenManager\n"
    assert violations_in(loaders, lazy) == ["mmpersona/models/loaders.py:4 (core) imports pipelines.tokens "
                                            "(pipelines)"]
    assert violations_in(loaders, "from ..server import app\n")  # relative, into the application layer
    assert violations_in(loaders, "from .. import cli\n")  # a submodule named in `from .. import`
    assert violations_in(loaders, "from mmpersona import PersonalizedVLMPipeline\n")  # through the facade
    assert violations_in(loaders, "_EXPORTS = {'X': 'pipelines.vlm'}\n")  # a lazy re-export map
    assert violations_in(loaders, "from mmpersona import ConceptDB, __version__\nfrom .tokens import TokenManager\n"
                                  "from concept_db import open_store\nimport torch\n") == []
    types = ROOT / "concept_db/types.py"
    # what concept_db/types.py did before the root error moved down: concept_db leaning on mmpersona
    assert violations_in(types, "from mmpersona.errors import MmpersonaError\n")
    assert violations_in(types, "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import mmpersona\n")
    assert violations_in(ROOT / "pipelines/vlm.py", "from mmpersona.server.app import create_app\n")
    assert violations_in(ROOT / "mmpersona/cli/chat.py", "from pipelines.vlm import PersonalizedVLMPipeline\n") == []
