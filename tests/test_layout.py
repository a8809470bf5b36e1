"""The dependency direction of STYLE.md, checked in fresh interpreters."""
import json
import subprocess
import sys

import pytest


def modules_after_import(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("module, forbidden", [
    ("trainfleet", {"torch"}),
    ("trainfleet.launcher.cli", {"torch", "torchvision"}),
    ("trainfleet.launcher.config", {"torch"}),
    ("trainfleet.engine.engine", {"trainfleet.launcher", "trainfleet.slurm", "trainfleet.models",
                                  "trainfleet.datasets", "torchvision"}),
    ("trainfleet.slurm.nodelist", {"torch", "trainfleet.engine", "submitit"}),
    ("trainfleet.slurm.status", {"torch", "trainfleet.engine", "trainfleet.launcher", "submitit"}),
    ("trainfleet.slurm.cluster", {"torch", "trainfleet.engine", "trainfleet.launcher", "submitit"}),
    ("trainfleet.slurm.job", {"torch", "trainfleet.engine", "trainfleet.launcher"}),
    ("trainfleet.launcher.submit", {"torch", "submitit"}),
    ("trainfleet.models", {"trainfleet.engine", "trainfleet.launcher", "torchvision"}),
    ("trainfleet.datasets", {"trainfleet.launcher", "torchvision"}),
])
def test_imports_stay_in_their_lane(module, forbidden):
    loaded = modules_after_import(module)
    assert not {m for m in loaded if m.split(".")[0] in forbidden or any(m.startswith(f + ".") or m == f
                                                                          for f in forbidden)}


def test_packages_do_not_shadow_top_level_names():
    loaded = modules_after_import("trainfleet.datasets")
    assert "datasets" not in loaded and "models" not in loaded
