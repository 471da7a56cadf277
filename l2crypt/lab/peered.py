"""The lab with two peered key servers on one switch (cascaded switches, CN101783792A fig. 5).

Same topology as ``lab.Lab`` (see its drawing), but the hosts are enrolled at
two key servers that each run their own CA and peer over mutual TLS::

    l2c-ks-<s>:  KS-A keyserverd 10.67.0.1:7788, peering 10.67.0.1:7790   state: keyserver/  (CA A)
                 KS-B keyserverd 10.67.0.2:7788, peering 10.67.0.2:7790   state: keyserver2/ (CA B)
                 each started with --peer <the other's host IDs>=sha256:<the other's CA>@<its peering address>
    h1, h2: enrolled at KS-A, agents --server 10.67.0.1:7788 (trust CA A only)
    h3:     enrolled at KS-B, agent  --server 10.67.0.2:7788 (trust CA B only)
            all on one br0

The CAs are made before the servers start, so each is told the other's
fingerprint.  ``ks_of(host)`` names a host's server; ``keyserverd(..., ks=)``
runs an operator command on either one.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pyroute2 import IPRoute

from .segment import KS_IP, KS_PORT, MGMT_PREFIX, Lab, LabError, Proc
from .support import wait_listening

KS2_IP = "10.67.0.2"
PEER_PORT = 7790
KS_IPS = {"ks1": KS_IP, "ks2": KS2_IP}
METRICS = {"ks1": "127.0.0.1:9479", "ks2": "127.0.0.1:9489"}  # one namespace: one port each


class PeeredLab(Lab):
    """The segment lab with two peered key servers, KS-A and KS-B, each with its own CA;
    ``ks2_hosts`` are enrolled at KS-B."""

    def __init__(self, *args, ks2_hosts: tuple[str, ...] = ("h3",), **kw):
        super().__init__(*args, **kw)
        self.ks2_hosts = tuple(ks2_hosts)
        self.fingerprints: dict[str, str] = {}

    # -- names
    def ks_of(self, host: str) -> str:
        return "ks2" if host in self.ks2_hosts else "ks1"

    def addr_of(self, name: str) -> str:
        return f"{KS_IPS[name]}:{KS_PORT}"

    def peer_addr_of(self, name: str) -> str:
        return f"{KS_IPS[name]}:{PEER_PORT}"

    def peer_ids(self, name: str) -> str:
        """The host IDs of key server ``name`` (its namespace, as the other one is told)."""
        return ",".join(h for h in self.hosts if self.ks_of(h) == name)

    def ks_state(self, name: str) -> Path:
        return self.ks_dir if name == "ks1" else self.state_dir / "keyserver2"

    def proc_name(self, name: str) -> str:
        return "keyserverd" if name == "ks1" else name

    # -- key servers
    def start_keyserver(self, timeout_s: float = 20.0) -> Proc:
        from keyserverd.ca import CertificateAuthority

        with IPRoute(netns=self.ns("ks"), flags=0) as ipr:
            idx = ipr.link_lookup(ifname="mbr0")[0]
            if not any(a.get_attr("IFA_ADDRESS") == KS2_IP for a in ipr.get_addr(index=idx)):
                ipr.addr("add", index=idx, address=KS2_IP, prefixlen=MGMT_PREFIX)
        for name in KS_IPS:
            state = self.ks_state(name)
            state.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.fingerprints[name] = CertificateAuthority.open(state, ()).ca_fingerprint()
        if self.fingerprints["ks1"] == self.fingerprints["ks2"]:
            raise LabError("the two key servers must have their own CAs")
        proc = self.start_ks("ks1", timeout_s)
        self.start_ks("ks2", timeout_s)
        return proc

    def start_ks(self, name: str, timeout_s: float = 20.0) -> Proc:
        other = "ks2" if name == "ks1" else "ks1"
        peer = f"{self.peer_ids(other)}={self.fingerprints[other]}@{self.peer_addr_of(other)}"
        proc = self.popen("ks", [self.cmd("keyserverd"), "--state-dir", self.ks_state(name),
                                 "--listen", self.addr_of(name), "--metrics-listen", METRICS[name],
                                 "--peer-listen", self.peer_addr_of(name), "--peer", peer],
                          name=self.proc_name(name))
        return wait_listening(proc, KS_IPS[name], KS_PORT, timeout_s, name)

    def keyserverd(self, *args: str, timeout: float = 20.0, ks: str = "ks1") -> subprocess.CompletedProcess:
        return self.exec("ks", [self.cmd("keyserverd"), "--state-dir", self.ks_state(ks), *args], timeout=timeout)

    def ks_status(self, name: str) -> dict:

        res = self.keyserverd("status", "--json", ks=name)
        if res.returncode != 0:
            raise LabError(f"keyserverd status ({name}) failed: {res.stdout}{res.stderr}")
        return json.loads(res.stdout)

    # -- hosts: each at its own key server
    def host_add(self, host_id: str, mac: str | None = None) -> dict:

        res = self.keyserverd("host", "add", host_id, "--json", *(["--mac", mac] if mac else []),
                              ks=self.ks_of(host_id))
        if res.returncode != 0:
            raise LabError(f"keyserverd host add {host_id} failed: {res.stdout}{res.stderr}")
        return json.loads(res.stdout)

    def enroll(self, host: str, token: str, fingerprint: str, host_id: str | None = None,
               state_dir: Path | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess:
        sd = state_dir or self.host_dir(host)
        sd.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.exec(host, [self.cmd("l2crypt"), "enroll", "--server", self.addr_of(self.ks_of(host)),
                                "--id", host_id or host, "--token", "-",  # on stdin: never in ps
                                "--ca-fingerprint", fingerprint, "--state-dir", sd],
                         timeout=timeout, input=token.encode() + b"\n")

    def agent_servers(self, host: str) -> list[str]:
        return [self.addr_of(self.ks_of(host))]
