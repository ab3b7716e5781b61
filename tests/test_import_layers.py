"""The package's import layers, read from its import statements (module level and inside functions): the command line
(`transformers_af2.commands`) is on top and nothing below it imports it; what the commands share (`commands.options`,
`transformers_af2.loading`) imports no command; the commands do not import one another; no module imports, however
indirectly, a module that imports it. And every module imports on its own."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "transformers_af2"

# The command line: the commands, and the entry points that run them. `trainer.cli` is `af2 train`'s parser and run
# (its options are every TrainingArguments field), with its own `python -m` entry for torchrun and accelerate.
ENTRY_POINTS = {"transformers_af2.__main__", "transformers_af2.cli", "transformers_af2.trainer.cli"}
# What every command uses to read its options and load its model: below the commands.
SHARED_BY_COMMANDS = {"transformers_af2.commands.options", "transformers_af2.loading"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported_modules(name: str) -> set[str]:
    """The package's modules `name` imports anywhere in its source (a `from X import y` counts as X.y when y is a
    module, else X)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module
            for alias in node.names:
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module)
    return {module for module in found if module in MODULES and module != name}


IMPORTS = {name: _imported_modules(name) for name in MODULES}


def _is_command_line(name: str) -> bool:
    return name == "transformers_af2.commands" or name.startswith("transformers_af2.commands.") or name in ENTRY_POINTS


def test_the_import_reader_sees_the_known_imports():
    # The reader itself: relative, absolute and function-level imports are found.
    assert "transformers_af2.commands.options" in IMPORTS["transformers_af2.commands.generate"]
    assert "transformers_af2.loading" in IMPORTS["transformers_af2.commands.generate"]
    assert "transformers_af2.families" in IMPORTS["transformers_af2.loading"]  # inside the function
    assert "transformers_af2.commands" in IMPORTS["transformers_af2.trainer.cli"]  # inside main()
    assert len(MODULES) > 50


def test_nothing_below_the_command_line_imports_it():
    wrong = {
        name: sorted(module for module in imported if _is_command_line(module))
        for name, imported in IMPORTS.items()
        if not _is_command_line(name)
    }
    assert {name: modules for name, modules in wrong.items() if modules} == {}


def test_what_the_commands_share_imports_no_command():
    for name in SHARED_BY_COMMANDS:
        assert [
            module for module in IMPORTS[name] if _is_command_line(module) and module not in SHARED_BY_COMMANDS
        ] == []
    # The family adapters are below loading.
    for name, imported in IMPORTS.items():
        if name.startswith("transformers_af2.families"):
            assert "transformers_af2.loading" not in imported, name


def test_commands_do_not_import_one_another():
    commands = {name for name in MODULES if name.startswith("transformers_af2.commands.")} - SHARED_BY_COMMANDS
    assert len(commands) == 8  # generate, convert, caption, eval, demo, serve, train, fast_settings
    for name in commands:
        assert IMPORTS[name] & (commands | {"transformers_af2.commands"}) == set(), name


def test_no_import_circle():
    """No module reaches itself through the imports it makes (at import time or when a function runs)."""
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name, path):
        state[name] = 1
        for module in sorted(IMPORTS[name]):
            if state.get(module) == 1:
                circles.append([*path[path.index(module) :], module])
            elif module not in state:
                visit(module, [*path, module])
        state[name] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [name])
    assert circles == [], "import circles:\n" + "\n".join(" -> ".join(circle) for circle in circles)


def test_every_module_imports():
    """Every module, imported in a fresh interpreter (sorted: a package before its modules). A module whose optional
    dependency is not installed here is listed as such; any other error fails."""
    script = (
        "import importlib, json, sys\n"
        "failed, optional = {}, {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as error:\n"
        "        (failed if (error.name or '').startswith('transformers_af2') else optional)[name] = repr(error)\n"
        "    except Exception as error:\n"
        "        failed[name] = repr(error)\n"
        "print(json.dumps([failed, optional]))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(sorted(MODULES))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    failed, optional = json.loads(done.stdout.strip().splitlines()[-1])
    assert failed == {}
    # Only the adapters of optional tools may miss their dependency.
    assert set(optional) <= {"transformers_af2.lmms_eval_af2"}, optional
