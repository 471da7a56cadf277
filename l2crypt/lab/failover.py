"""The lab with two key servers that share one store (failover tests).

Same topology as ``lab.Lab`` (see its drawing), plus a second keyserverd in
the key-server namespace, on a second address of the management bridge::

    l2c-ks-<s>:  ks1 keyserverd 10.67.0.1:7788 (priority 1)   state: keyserver/
                 ks2 keyserverd 10.67.0.2:7788 (priority 2)   state: keyserver2/ (a copy of ks1's CA)
                 both on ``store_url`` (PostgreSQL) when given, with one
                 KEK (``kek_path``, made by the lab) for both
    every agent: --server 10.67.0.1:7788 --server 10.67.0.2:7788 + ``agent_args``

``kill_ks(name)`` / ``start_ks(name)`` stop and start one of them.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

from pyroute2 import IPRoute

from .segment import KS_IP, KS_PORT, MGMT_PREFIX, Lab
from .support import wait_listening

KS2_IP = "10.67.0.2"
KS_IPS = {"ks1": KS_IP, "ks2": KS2_IP}
CA_FILES = ("ca.key", "ca.crt", "server.key", "server.crt")


class FailoverLab(Lab):
    """The segment lab with two key servers sharing one store (SQLite file or ``store_url``),
    for failover tests."""

    def __init__(self, *args, store_url: str = "", agent_args: tuple[str, ...] = (), **kw):
        super().__init__(*args, **kw)
        self.store_url = store_url
        self.agent_args = tuple(agent_args)
        #: The KEK both servers seal the shared store's keys under.
        self.kek_path = self.state_dir / "store.kek"

    def addr_of(self, name: str) -> str:
        return f"{KS_IPS[name]}:{KS_PORT}"

    def ks_state(self, name: str) -> Path:
        return self.ks_dir if name == "ks1" else self.state_dir / "keyserver2"

    def _store_args(self) -> list[str]:
        if not self.store_url:
            return []
        if not self.kek_path.exists():
            from keyserverd.store.kek import create_kek_file

            self.state_dir.mkdir(parents=True, exist_ok=True)
            create_kek_file(self.kek_path)
        return ["--store", self.store_url, "--kek-file", str(self.kek_path)]

    def start_keyserver(self, timeout_s: float = 20.0):
        with IPRoute(netns=self.ns("ks"), flags=0) as ipr:
            idx = ipr.link_lookup(ifname="mbr0")[0]
            if not any(a.get_attr("IFA_ADDRESS") == KS2_IP for a in ipr.get_addr(index=idx)):
                ipr.addr("add", index=idx, address=KS2_IP, prefixlen=MGMT_PREFIX)
        proc = self.start_ks("ks1", timeout_s)
        ks2 = self.ks_state("ks2")
        ks2.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in CA_FILES:
            shutil.copy2(self.ks_dir / name, ks2 / name)
        self.start_ks("ks2", timeout_s)
        return proc

    def start_ks(self, name: str, timeout_s: float = 20.0):
        state = self.ks_state(name)
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Both servers share the ks namespace: give each its own metrics port.
        metrics = f"127.0.0.1:{9479 if name == 'ks1' else 9489}"
        proc = self.popen("ks", [self.cmd("keyserverd"), "--state-dir", state, "--listen", self.addr_of(name),
                                 "--metrics-listen", metrics, "--workers", "1", *self._store_args()],
                          name="keyserverd" if name == "ks1" else name)
        return wait_listening(proc, KS_IPS[name], KS_PORT, timeout_s, name)

    def kill_ks(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.proc("keyserverd" if name == "ks1" else name)
        if proc is not None:
            self.stop(proc, sig)

    def keyserverd(self, *args: str, timeout: float = 20.0):
        return self.exec("ks", [self.cmd("keyserverd"), "--state-dir", self.ks_dir, *args, *self._store_args()],
                         timeout=timeout)

    def agent_servers(self, host: str) -> list[str]:
        return [self.addr_of("ks1"), self.addr_of("ks2")]
