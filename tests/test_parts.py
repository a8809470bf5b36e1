"""A missing part skips a test on a developer's machine and fails it under scripts/test.sh."""
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SAMPLE = '''
import pytest

@pytest.mark.horovod
def test_needs_horovod():
    pass

@pytest.mark.gpu(devices=64)
def test_needs_64_gpus():
    pass

def test_skips_itself():
    pytest.skip("nothing to check here")

def test_plain():
    pass
'''


def run_sample(tmp_path, require):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    hidden = tmp_path / "hide" / "horovod"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'hide'}{os.pathsep}{REPO}"}
    env.pop("TRAINFLEET_REQUIRE", None)
    if require is not None:
        env["TRAINFLEET_REQUIRE"] = require
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-rA", "-p", "no:cacheprovider",
                             "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    return result


def test_without_requirements_missing_parts_are_skipped_with_the_reason(tmp_path):
    result = run_sample(tmp_path, None)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 3 skipped" in result.stdout
    assert "horovod: Horovod is not importable (hidden by the test)" in result.stdout
    assert "required (TRAINFLEET_REQUIRE): none" in result.stdout


def test_under_requirements_a_missing_part_and_any_other_skip_fail(tmp_path):
    result = run_sample(tmp_path, "horovod")
    assert result.returncode == 1, result.stdout
    assert "horovod is required here (TRAINFLEET_REQUIRE) but missing: Horovod is not importable" in result.stdout
    assert "skipped while TRAINFLEET_REQUIRE is set (scripts/test.sh): Skipped: nothing to check here" in result.stdout
    # hardware a machine lacks (64 GPUs) is still a skip, with its reason
    assert "gpu: " in result.stdout and "1 passed, 1 skipped" in result.stdout.replace("1 failed, ", "")


def test_an_unknown_part_name_is_refused(tmp_path):
    result = run_sample(tmp_path, "horovod,slrum")
    assert result.returncode != 0 and "names ['slrum']" in result.stdout + result.stderr


@pytest.mark.parametrize("part", ["horovod", "slurm", "multinode", "ssh"])
def test_scripts_test_sh_requires_the_parts_ci_installs(part):
    text = (REPO / "scripts" / "test.sh").read_text()
    line = next(line for line in text.splitlines() if line.startswith("export TRAINFLEET_REQUIRE="))
    assert part in line
