"""The package layout keeps its promises.

Each folder is one concept and each module one idea, whatever its length, so what is checked here is what a line
cap cannot see: no import cycle (function-level imports included), the tiny demo models and the tests stay out of
the library, no fragment of a module (under 40 lines) unless it is an ``__init__``, a ``__main__`` or a documented
shim kept for a documented command or import path, no issue numbers a reader cannot look up, every folder says what
it is, and the tests mirror the package."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "memvp_peft"
TESTS = ROOT / "tests"

# The programs that run the embedded default (memvp-train, memvp-bench) build the demo models; nothing below them may.
DEMO_MODELS = {"memvp_peft.demo_models", "memvp_peft.local_models"}
DEMO_MODEL_USERS = ("memvp_peft.cli", "memvp_peft.bench")
SHORTEST_MODULE = 40
# "issue" followed by a number, written so that this file does not match itself
ISSUE_NUMBER = re.compile(r"\bissues?[ _#-]*" + r"\d+", re.IGNORECASE)
# test folders that mirror a repository folder next to the package rather than a part of it
NON_PACKAGE_TEST_FOLDERS = {"integrations"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """memvp_peft modules that `path` imports anywhere in its body (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t.startswith("memvp_peft")}
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {t for t in _imports(path) if t in paths and t != name} for name, path in paths.items()}


def _find_cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            # a package's __init__ importing its own submodules (re-exports) is not a cycle back into it
            if target.startswith(node + ".") or node.startswith(target + ".") and target == node.rpartition(".")[0]:
                continue
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_between_modules():
    assert _find_cycle(_graph()) is None


def test_the_cycle_finder_sees_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def _demo_model_offenders(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        name for name, targets in graph.items()
        if name not in DEMO_MODELS and not name.startswith(DEMO_MODEL_USERS) and targets & DEMO_MODELS
    )


def test_only_the_programs_import_the_demo_models():
    """The tiny demo models are for the embedded default, the benchmark and the tests; the library never needs them."""
    assert not _demo_model_offenders(_graph())


def test_the_demo_model_check_sees_a_library_module_importing_them():
    graph = {"memvp_peft.tuner.model": {"memvp_peft.demo_models"}, "memvp_peft.cli.train": {"memvp_peft.demo_models"}}
    assert _demo_model_offenders(graph) == ["memvp_peft.tuner.model"]


# The serving plugin runs in vLLM's processes, in an environment of its own (docs/serving.md): it may use the vision
# path and the shared loaders, never the training stack.
SERVING = "memvp_peft.serving"
SERVING_MAY_IMPORT = ("memvp_peft.serving", "memvp_peft.vision", "memvp_peft.hub", "memvp_peft.data.images",
                      "memvp_peft.cli.model_loading")
TRAINING_STACK = ("trl", "deepspeed", "datasets", "bitsandbytes")


def _serving_offenders(paths: list[pathlib.Path]) -> list[str]:
    offenders = []
    for path in paths:
        for target in sorted(_imports(path)):
            if target != "memvp_peft" and not target.startswith(SERVING_MAY_IMPORT):
                offenders.append(f"{path.name}: {target}")
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in TRAINING_STACK]
    return offenders


def test_the_serving_plugin_imports_nothing_of_the_training_stack():
    assert not _serving_offenders(sorted((PACKAGE / "serving").rglob("*.py")))


def test_the_serving_check_sees_a_training_import(tmp_path):
    (tmp_path / "memvp_peft" / "serving").mkdir(parents=True)
    module = tmp_path / "memvp_peft" / "serving" / "bad.py"
    module.write_text("import trl\nfrom ..trainers import MemVPSFTTrainer\nfrom .bank import MemoryBank\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "memvp_peft"
    try:
        assert _serving_offenders([module]) == ["bad.py: memvp_peft.trainers", "bad.py: memvp_peft.trainers.MemVPSFTTrainer",
                                                "bad.py: trl"]
    finally:
        PACKAGE = saved


def test_no_module_imports_the_tests():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "tests" or n.startswith(("tests.", "conftest"))]
    assert not offenders, offenders


def _is_documented_shim(source: str) -> bool:
    """A shim: a docstring that says it is one, then nothing but imports, `__all__` and a `__main__` guard."""
    tree = ast.parse(source)
    docstring = ast.get_docstring(tree) or ""
    allowed = (ast.Import, ast.ImportFrom)
    for node in tree.body[1:] if docstring else tree.body:
        if isinstance(node, allowed):
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in getattr(node, "targets", [getattr(node, "target", None)])
        ):
            continue
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            continue
        return False
    return "shim" in docstring.lower()


def _fragments(paths: list[pathlib.Path]) -> list[str]:
    return sorted(
        f"{path.relative_to(ROOT)} ({len(path.read_text().splitlines())} lines)"
        for path in paths
        if path.name not in ("__init__.py", "__main__.py")
        and len(path.read_text().splitlines()) < SHORTEST_MODULE
        and not _is_documented_shim(path.read_text())
    )


def test_no_module_is_a_fragment_unless_it_is_a_documented_shim():
    """One idea per module whatever its length: a module under 40 lines is a piece of an idea that lives elsewhere."""
    assert not _fragments(list(PACKAGE.rglob("*.py")))


def test_the_fragment_check_sees_a_short_module_and_accepts_a_documented_shim(tmp_path):
    fragment = tmp_path / "fragment.py"
    fragment.write_text('"""A few helpers."""\n\ndef helper():\n    return 1\n')
    shim = tmp_path / "shim.py"
    shim.write_text('"""Shim for `python -m pkg.tool`."""\nfrom .cli.tool import main\n\nif __name__ == "__main__":\n    main()\n')
    undocumented = tmp_path / "undocumented.py"
    undocumented.write_text('"""The tool."""\nfrom .cli.tool import main\n')
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert _fragments([fragment, shim, undocumented]) == ["fragment.py (4 lines)", "undocumented.py (2 lines)"]
    finally:
        ROOT = saved


def _issue_numbers(paths) -> list[str]:
    found = []
    for path in paths:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if ISSUE_NUMBER.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return found


def test_no_issue_numbers_in_code():
    """A reader cannot look up an issue by its number: code and scripts say what the number stood for."""
    places = [PACKAGE, ROOT / "memvp_peft_console", ROOT / "examples", ROOT / "integrations", TESTS]
    paths = [p for place in places for p in place.rglob("*") if p.suffix in (".py", ".sh", ".yaml", ".json") and p.is_file()]
    paths += [ROOT / "README.md", ROOT / ".ci" / "run"]
    assert not _issue_numbers([p for p in paths if p.exists()])


def test_the_issue_number_check_sees_one(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("x = 1\n# kept for " + "Issue " + "16" + " compatibility\n# issued to 3 users\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert _issue_numbers([path]) == ["m.py:2: # kept for " + "Issue " + "16" + " compatibility"]
    finally:
        ROOT = saved


def test_every_folder_of_the_package_says_what_it_is():
    undocumented = [
        str(init.relative_to(ROOT)) for init in PACKAGE.rglob("__init__.py")
        if len((ast.get_docstring(ast.parse(init.read_text())) or "").split()) < 5
    ]
    assert not undocumented


def _unmirrored(package: pathlib.Path, tests: pathlib.Path) -> tuple[list[str], list[str]]:
    parts = {p.name for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    parts |= {p.stem for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")}
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    subpackages = {p.name for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return sorted(folders - parts - NON_PACKAGE_TEST_FOLDERS), sorted(subpackages - folders)


def test_the_tests_mirror_the_package():
    """tests/<x>/ holds the tests of memvp_peft/<x>: a test folder names a part of the package, each subpackage has one."""
    stray, untested = _unmirrored(PACKAGE, TESTS)
    assert (stray, untested) == ([], [])


def test_the_mirror_check_sees_a_stray_and_a_missing_folder(tmp_path):
    (tmp_path / "pkg" / "vision").mkdir(parents=True)
    (tmp_path / "pkg" / "vision" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "tasks").mkdir()
    (tmp_path / "pkg" / "tasks" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "processing.py").write_text("")
    for folder in ("vision", "processing", "helpers"):
        (tmp_path / "tests" / folder).mkdir(parents=True)
    assert _unmirrored(tmp_path / "pkg", tmp_path / "tests") == (["helpers"], ["tasks"])
