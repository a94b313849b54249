"""The project's outline, as a test: imports run down the layers, never back up.

server.py → handlers/ → chat_gpt_proxy/ (and settings.py); handler modules
(those with routes) import only the shared bases, never each other; product
code never imports from tests/.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASES = {"base", "admission", "errors", "relay", "forwarding", "openai_style", "usage_page", "pages", "private"}


def imported_modules(path: pathlib.Path, root: pathlib.Path = ROOT) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(module + "." + alias.name for alias in node.names)
    return found


def top(module: str) -> str:
    return module.split(".")[0]


def upward_imports(root: pathlib.Path) -> list[str]:
    """Every import that runs back up the layers, as "file imports module"."""
    wrong = []
    for path in sorted((root / "chat_gpt_proxy").rglob("*.py")):
        for module in sorted(imported_modules(path, root)):
            if top(module) in ("handlers", "server", "tests"):
                wrong.append("%s imports %s" % (path.relative_to(root), module))
    for path in sorted((root / "handlers").glob("*.py")):
        for module in sorted(imported_modules(path, root)):
            parts = module.split(".")
            if top(module) in ("server", "tests"):
                wrong.append("%s imports %s" % (path.relative_to(root), module))
            elif (
                path.name != "__init__.py"
                and parts[0] == "handlers"
                and len(parts) > 1
                and parts[1] not in BASES | {path.stem}
            ):
                wrong.append("%s imports the handler module %s" % (path.relative_to(root), module))
    for path in [root / "server.py", root / "settings.py"]:
        if path.exists() and any(top(m) == "tests" for m in imported_modules(path, root)):
            wrong.append("%s imports tests" % path.name)
    return wrong


def test_imports_run_down_the_layers():
    assert upward_imports(ROOT) == []


def test_an_import_running_back_up_is_found(tmp_path):
    """The check can fail: a package module importing a handler, a handler importing another handler."""
    (tmp_path / "chat_gpt_proxy" / "upstream").mkdir(parents=True)
    (tmp_path / "handlers").mkdir()
    (tmp_path / "chat_gpt_proxy" / "upstream" / "call.py").write_text("from handlers.base import BaseHandler\n")
    (tmp_path / "handlers" / "realtime.py").write_text("from .passthrough import upstream_url\nfrom .base import X\n")
    assert upward_imports(tmp_path) == [
        "chat_gpt_proxy/upstream/call.py imports handlers.base",
        "chat_gpt_proxy/upstream/call.py imports handlers.base.BaseHandler",
        "handlers/realtime.py imports the handler module handlers.passthrough",
        "handlers/realtime.py imports the handler module handlers.passthrough.upstream_url",
    ]
