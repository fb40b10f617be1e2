"""Imports go one way: deployments -> actors -> losses, with configs the leaf under all of them.

- losses import nothing of actors or deployments; actors never import deployments; configs
  import none of the three; `actors.hf` and `actors.megatron` never import each other.
- Checked statically (every import statement, lazy ones inside functions included), and at run
  time for the ingress: importing it must not import torch.
"""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("configs", "losses", "actors", "deployments")

# importing package (prefix) -> module prefixes it must never import
FORBIDDEN = {
    "configs": ("actors", "deployments", "losses"),
    "losses": ("actors", "deployments"),
    "actors": ("deployments",),
    "actors.hf": ("actors.megatron",),
    "actors.megatron": ("actors.hf",),
    "deployments": ("torch",),
}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(root: Path, path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file; `from a import b` counts as a and a.b."""
    package = module_name(root, path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".")
            if not node.level:
                base = node.module or ""
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(root: Path) -> list[str]:
    problems = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            importer = module_name(root, path)
            rules = [(p, banned) for p, bans in FORBIDDEN.items() if within(importer, p) for banned in bans]
            for line, imported in imported_modules(root, path):
                for prefix, banned in rules:
                    problem = f"{path.relative_to(root)}:{line}: {prefix} must not import {banned}"
                    if within(imported, banned) and problem not in problems:
                        problems.append(problem)
    return problems


def test_imports_go_one_way():
    assert violations(REPO) == []


def test_the_check_catches_each_kind_of_wrong_import(tmp_path):
    files = {
        "configs/__init__.py": "",
        "configs/schema.py": "from actors.work import Datum\n",
        "losses/__init__.py": "",
        "losses/ce.py": "def f():\n    from deployments import wire\n",
        "actors/__init__.py": "",
        "actors/work.py": "import deployments.app\n",
        "actors/hf/__init__.py": "",
        "actors/hf/backend.py": "from ..megatron import rank\n",
        "actors/megatron/__init__.py": "",
        "actors/megatron/rank.py": "from actors import hf\n",
        "deployments/__init__.py": "",
        "deployments/wire.py": "import torch.nn\nfrom actors import work\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert [problem.split(":")[0] for problem in violations(tmp_path)] == [
        "configs/schema.py",
        "losses/ce.py",
        "actors/hf/backend.py",
        "actors/megatron/rank.py",
        "actors/work.py",
        "deployments/wire.py",
    ]


def test_the_ingress_never_imports_torch():
    code = "import sys, deployments.ingress, deployments.app; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
