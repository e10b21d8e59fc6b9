"""engine/ and schedulers/ run with onnxruntime and numpy alone: torch and diffusers must never be imported."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"torch", "diffusers", "transformers", "optimum"}

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {forbidden!r}:
            raise ImportError("blocked by test: " + name)
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("package", ["engine", "schedulers", "registry", "serve"])
def test_runtime_packages_have_no_heavy_imports_in_source(package):
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path} imports {name}"


def test_runtime_imports_and_runs_with_torch_unimportable():
    code = (
        BLOCKER.format(forbidden=FORBIDDEN)
        + f"""
import numpy as np
import engine, schedulers, registry, cli
s = schedulers.from_config(registry.get("sdxl-turbo").scheduler)
s.set_timesteps(1)
x = np.zeros((1, 4, 8, 8), np.float32)
s.step(np.zeros_like(x), s.timesteps[0], x, generator=np.random.default_rng(0))
assert not any(m.split(".")[0] in {FORBIDDEN!r} for m in sys.modules), "a forbidden module got imported"
print("ok")
"""
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_blocker_really_blocks():
    code = BLOCKER.format(forbidden=FORBIDDEN) + "import torch\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "blocked by test" in out.stderr


def test_exporters_share_only_formats_with_the_engine():
    for path in (ROOT / "exporters").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                assert node.module.split(".")[0] != "engine", f"{path} imports {node.module}"
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "engine" for a in node.names), path
