"""The policy layer must stay free of ray and torch (DESIGN.md, layer 1)."""
import subprocess
import sys

import pkgutil

import trident_rs.policy


def test_policy_package_imports_neither_ray_nor_torch():
    modules = [m.name for m in pkgutil.walk_packages(trident_rs.policy.__path__, "trident_rs.policy.")]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"policy layer imported: {out.stdout.strip()}"
    assert modules, "no policy modules found"
