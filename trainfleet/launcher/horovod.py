"""What ``horovodrun --gloo`` gives its workers, provided by trainfleet's launcher.

Node 0's agent runs Horovod's HTTP rendezvous server on a socket it bound before
forking the workers (no port race); every worker gets the HOROVOD_* variables of its
slot. Other nodes reach the server at MASTER_PORT + 1.
"""
from __future__ import annotations

import socket
import threading
from typing import Any

from trainfleet.launcher.config import LaunchConfig, Placement
from trainfleet.launcher.network import interface_for


def rendezvous_port(cfg: LaunchConfig) -> int | None:
    """The rendezvous server's port: as configured, else MASTER_PORT + 1 when the master
    port is fixed (every node can derive it), else None (a free one, single node)."""
    if cfg.horovod_port:
        return cfg.horovod_port
    return cfg.master_port + 1 if cfg.master_port else None


def slot_env(cfg: LaunchConfig, place: Placement, local_rank: int, port: int) -> dict[str, str]:
    """HOROVOD_* variables of one worker (ranks laid out node by node, in this attempt's order)."""
    procs = cfg.procs_per_node
    env = {
        "HOROVOD_HOSTNAME": f"node{place.index}",
        "HOROVOD_RANK": place.index * procs + local_rank, "HOROVOD_SIZE": place.nodes * procs,
        "HOROVOD_LOCAL_RANK": local_rank, "HOROVOD_LOCAL_SIZE": procs,
        "HOROVOD_CROSS_RANK": place.index, "HOROVOD_CROSS_SIZE": place.nodes,
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": cfg.master_addr, "HOROVOD_GLOO_RENDEZVOUS_PORT": port,
        "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_IFACE": interface_for(cfg.master_addr) or "lo",
    }
    return {key: str(value) for key, value in env.items()}


def _slots(cfg: LaunchConfig, nodes: int) -> list[Any]:
    from horovod.runner.common.util.hosts import SlotInfo

    procs = cfg.procs_per_node
    return [SlotInfo(hostname=f"node{n}", rank=n * procs + r, local_rank=r, cross_rank=n, size=nodes * procs,
                     local_size=procs, cross_size=nodes)
            for n in range(nodes) for r in range(procs)]


class RendezvousService:
    """Horovod's rendezvous HTTP server on a socket that is already bound and listening."""

    def __init__(self, sock: socket.socket, cfg: LaunchConfig, nodes: int):
        from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

        class AdoptedServer(RendezvousHTTPServer):
            def server_bind(self) -> None:  # take our socket instead of binding a new one
                self.socket.close()
                self.socket = sock
                self.server_address = sock.getsockname()[:2]
                self.server_name, self.server_port = self.server_address[0], self.server_address[1]

            def server_activate(self) -> None:  # already listening
                pass

        self.server = AdoptedServer(sock.getsockname()[:2], RendezvousHandler, 0)
        self.server.init(_slots(cfg, nodes))
        self.thread = threading.Thread(target=self.server.serve_forever, name="horovod-rendezvous", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Shut the server down and close its socket."""
        self.server.shutdown()
        self.thread.join()
        self.server.server_close()
