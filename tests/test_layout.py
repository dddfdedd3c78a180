"""The house: stages as subpackages, data flowing one way, entry points that read as a table of
contents. Checked on the source, so the architecture cannot rot silently (``lint-imports`` checks
the layers of ``[tool.importlinter]`` in pyproject.toml; these tests check what it cannot)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

from tests.conftest import ROOT

PACKAGE = ROOT / "pipeline"
ENTRY_POINTS = {"train", "evaluate", "serve", "export", "merge", "report", "estimate", "vllm_engine"}
# The packages that may handle Hydra's own objects besides the entry points and the sweeper plugin:
# what the entry points share (composing, converting, validating, running a command).
HYDRA_SIDE = ("pipeline.commands",)
# Third-party packages heavy enough that start-up must not pay for them: the only imports that
# may sit inside functions, each with its reason in a comment.
HEAVY = {"torch", "transformers", "peft", "datasets", "bitsandbytes", "deepspeed", "optuna", "sqlalchemy",
         "matplotlib", "vllm", "wandb", "evaluate", "rouge_score", "accelerate", "tqdm", "lm_eval"}


def modules() -> Dict[str, Path]:
    """Every module of the package, by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "assets" in path.relative_to(PACKAGE).parts[:1]:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = modules()


def imports(path: Path) -> Iterator[Tuple[ast.AST, List[str], bool]]:
    """(node, the dotted names it imports, whether it sits inside a function) of every import
    that runs (those under ``if TYPE_CHECKING:`` only name types for annotations)."""
    tree = ast.parse(path.read_text())
    inside, typing_only = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
        elif isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            typing_only.update(id(n) for n in ast.walk(node))
    name = next(n for n, p in MODULES.items() if p == path)
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            yield node, [a.name for a in node.names], id(node) in inside
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            yield node, [base] + [f"{base}.{a.name}" for a in node.names], id(node) in inside


def internal(names: List[str]) -> Set[str]:
    """The package's own modules among ``names`` (a name is resolved to its module)."""
    found = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def graph() -> Dict[str, Set[str]]:
    edges = {}
    for name, path in MODULES.items():
        targets = set()
        for _, names, _ in imports(path):
            targets |= internal(names)
        if path.name == "__init__.py":  # a package importing its own children is no circle
            targets = {t for t in targets if not t.startswith(name + ".")}
        edges[name] = targets - {name}
    return edges


def circles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_anywhere():
    """Module- and function-level imports alike: a circle hidden in a function is still one."""
    edges = graph()
    assert circles(edges) == []
    # ... and the check finds one where there is one
    assert circles({**edges, "pipeline.config.errors": {"pipeline.runs.runfolder"}}) != []


def test_entry_points_alone_at_the_top_and_train_reads_as_a_table_of_contents():
    top = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    assert top == ENTRY_POINTS and len(top) <= 12
    assert len((PACKAGE / "train.py").read_text().splitlines()) <= 150
    stages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert stages >= {"config", "commands", "runs", "data", "model", "adapters", "trainer", "scoring",
                      "study", "comparison", "server"}
    for stage in stages - {"assets"}:  # each says what is inside
        assert ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text())), stage


def test_imports_inside_functions_are_heavy_third_party_packages_with_a_reason():
    """Our own modules are imported at the top (the graph stays visible); a function imports only a
    package start-up must not pay for, or one of our modules that imports such a package at its
    top (the bottleneck tuner defines torch and peft classes), and says why in a comment."""
    heavy_own = {name for name, path in MODULES.items()
                 if any(not inside and any(n.split(".")[0] in HEAVY for n in names)
                        for _, names, inside in imports(path))}
    assert heavy_own == {"pipeline.adapters.bottleneck.tuner"}
    problems = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for node, names, inside in imports(path):
            if not inside:
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            # `from package import module` imports that module (and runs the package's __init__)
            own = internal([n for n in names[1:] if n in MODULES] or names[:1]) if isinstance(
                node, ast.ImportFrom) else internal(names)
            if own - heavy_own:
                problems.append(f"{where}: imports {sorted(own - heavy_own)} inside a function")
            elif not own and names[0].split(".")[0] not in HEAVY:
                problems.append(f"{where}: {names[0]} is not heavy; import it at the top")
            first = node.lineno - 1  # the comment may sit on the block's first import or above it
            while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
                first -= 1
            block = lines[first:node.end_lineno]
            if not any("#" in line for line in block) and not lines[first - 1].strip().startswith("#"):
                problems.append(f"{where}: {names[0]} imported inside a function without a reason")
    assert problems == []


def _parameters(function: ast.AST) -> Iterator[ast.arg]:
    args = function.args
    yield from [*args.posonlyargs, *args.args, *args.kwonlyargs]


def test_stages_take_typed_configs_not_hydras_objects():
    """Only the entry points and pipeline.commands handle a DictConfig; no stage function takes a
    config typed ``Any``."""
    problems = []
    for name, path in MODULES.items():
        if name.rpartition(".")[2] in ENTRY_POINTS and name.count(".") == 1 or name.startswith(HYDRA_SIDE):
            continue
        source = path.read_text()
        if "DictConfig" in source:
            problems.append(f"{name} mentions DictConfig")
        for function in ast.walk(ast.parse(source)):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in _parameters(function):
                    annotation = ast.unparse(arg.annotation) if arg.annotation else ""
                    if arg.arg in ("cfg", "config", "settings") and annotation in ("", "Any", "'Any'"):
                        problems.append(f"{name}.{function.name}({arg.arg}: {annotation or 'untyped'})")
    assert problems == []


def test_measuring_needs_no_trainer():
    """The scoring stage imports neither transformers' Trainer nor its arguments (the import
    contract keeps it from the trainer stage; this, from the Trainer itself)."""
    for name, path in MODULES.items():
        if not name.startswith("pipeline.scoring"):
            continue
        for _, names, _ in imports(path):
            assert not any(n.startswith("transformers.trainer") or n.rpartition(".")[2] in
                           ("Trainer", "TrainingArguments", "TrainerCallback") for n in names), (name, names)


def test_the_import_contracts_hold():
    """import-linter (the test extra) checks the layers; CI also runs ``lint-imports`` itself."""
    command = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(command)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
