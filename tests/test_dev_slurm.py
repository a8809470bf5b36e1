"""scripts/dev-slurm.sh stop stops what it started (by pid file) and nothing else on the host."""
import os
import shutil
import subprocess

from tests.conftest import REPO, pid_alive

DAEMONS = ("slurmd", "slurmctld", "slurmdbd", "slurmstepd", "mysqld", "mariadbd", "munged")


def test_stop_leaves_the_hosts_own_daemons_alone(tmp_path):
    """Processes named like a host's SLURM, MariaDB and munge daemons survive `stop` of a
    cluster that did not start them (the old script killed every one of them by name)."""
    decoys = []
    try:
        for name in DAEMONS:
            binary = tmp_path / "bin" / name
            binary.parent.mkdir(exist_ok=True)
            shutil.copy("/bin/sleep", binary)
            decoys.append(subprocess.Popen([str(binary), "300"]))
        env = {**os.environ, "TRAINFLEET_SLURM_DIR": str(tmp_path / "cluster")}
        result = subprocess.run(["bash", str(REPO / "scripts" / "dev-slurm.sh"), "stop"], capture_output=True,
                                text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "stopped" in result.stderr
        for name, decoy in zip(DAEMONS, decoys):
            assert pid_alive(decoy.pid), f"stop killed a {name} it did not start"
    finally:
        for decoy in decoys:
            decoy.kill()
            decoy.wait()
