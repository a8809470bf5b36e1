"""Two 'hosts' (network namespaces, see twohosts.py), each with its own OpenSSH server on port 22
and key-based root login set up by the test. Needs root, iproute2 and openssh-server."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.twohosts import TwoHosts

SSHD = "/usr/sbin/sshd"


def available() -> str | None:
    from tests import twohosts

    reason = twohosts.available()
    if reason is None and not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")):
        reason = "needs openssh-server and openssh-client (apt-get install openssh-server)"
    return reason


class SshHosts(TwoHosts):
    """Namespaces A and B, an sshd in each (B's can hide a folder under an empty tmpfs)."""

    def __init__(self, folder: Path, hide_on_b: Path | None = None) -> None:
        super().__init__()
        self.folder, self.hide_on_b = folder / "ssh", hide_on_b
        self.sshd: list[subprocess.Popen] = []

    def __enter__(self) -> "SshHosts":
        super().__enter__()
        try:
            self._keys()
            for host in (0, 1):
                self._start_sshd(host)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _keys(self) -> None:
        self.folder.mkdir(parents=True)
        for name in ("host", "client", "stranger"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.folder / name)], check=True)
        shutil.copy(self.folder / "client.pub", self.folder / "authorized_keys")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder

    def _start_sshd(self, host: int) -> None:
        config = self.folder / f"sshd_config.{host}"
        config.write_text("\n".join([
            "Port 22", f"ListenAddress {self.addrs[host]}", f"HostKey {self.folder / 'host'}",
            f"AuthorizedKeysFile {self.folder / 'authorized_keys'}", "PermitRootLogin prohibit-password",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
            f"PidFile {self.folder / f'sshd.{host}.pid'}", ""]))
        command = f"exec {SSHD} -D -e -f {config}"
        if host == 1 and self.hide_on_b is not None:
            command = f"mount -t tmpfs tmpfs {self.hide_on_b} && {command}"
        log = open(self.folder / f"sshd.{host}.log", "w")
        self.sshd.append(subprocess.Popen(["ip", "netns", "exec", self.names[host], "unshare", "-m",
                                           "--propagation", "private", "sh", "-c", command],
                                          stdout=log, stderr=log))
        log.close()
        deadline = time.monotonic() + 10
        while subprocess.run(["ip", "netns", "exec", self.names[host], "bash", "-c",
                              f"exec 3<>/dev/tcp/{self.addrs[host]}/22"], capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {(self.folder / f'sshd.{host}.log').read_text()}")
            time.sleep(0.1)

    def ssh_opts(self, key: str = "client") -> str:
        """What a user would put in ~/.ssh/config, as one --ssh-opt value."""
        return (f"-i {self.folder / key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                "-o LogLevel=ERROR")

    def pids(self, host: int) -> list[int]:
        """The namespace's processes, apart from its listening sshd (and the unshare/ip that started it)."""
        listeners = {p.pid for p in self.sshd}
        return [pid for pid in super().pids(host) if pid not in listeners]

    def __exit__(self, *exc) -> None:
        for process in self.sshd:
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        super().__exit__(*exc)
