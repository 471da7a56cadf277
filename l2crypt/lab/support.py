"""Helpers of the l2crypt lab (``l2crypt.lab.segment``): processes it starts in
namespaces, and the pcap files its captures write.

1. ``Proc`` records a started process by PID *and* start time, so a recycled
   PID is never signalled; ``stop_proc`` sends SIGTERM, waits (bounded), then
   SIGKILL.
2. ``wait_dad_done`` waits out IPv6 duplicate address detection on a port.
3. ``read_pcap`` reads the frames of a classic pcap file (what tcpdump -w
   writes), ``read_pcap_records`` with their times; ``ethertype_counts``
   summarises them.
"""

from __future__ import annotations

import os
import secrets
import signal
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute


class LabError(Exception):
    """The lab could not be built or a step of it failed; the message says which."""


IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40


def wait_dad_done(ns: str, ifname: str, timeout_s: float = 10.0) -> None:
    """Wait until duplicate address detection is over on the IPv6 addresses of
    ``ifname`` in netns ``ns``; LabError if one failed or stays tentative."""
    deadline = time.monotonic() + timeout_s
    with IPRoute(netns=ns, flags=0) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        while idx:
            flags = [a.get_attr("IFA_FLAGS", a["flags"]) for a in ipr.get_addr(family=10, index=idx[0])]
            if any(f & IFA_F_DADFAILED for f in flags):
                raise LabError(f"duplicate address detection failed on {ifname} in {ns}")
            if not any(f & IFA_F_TENTATIVE for f in flags):
                return
            if time.monotonic() > deadline:
                raise LabError(f"IPv6 addresses of {ifname} in {ns} still tentative after {timeout_s} s")
            time.sleep(0.1)


# --- processes -----------------------------------------------------------------


def _start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def cpu_seconds(pid: int, with_children: bool = False) -> float:
    """User plus system CPU time of ``pid`` so far, in seconds; ``with_children``:
    plus that of its live descendants (an agent's datapath process)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if not with_children:
        return own
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(c) for c in task.read_text().split()]
        except OSError:
            pass
    for child in children:
        try:
            own += cpu_seconds(child, True)
        except OSError:
            pass  # it ended meanwhile
    return own


@dataclass
class Proc:
    """A process the lab started: it is a session leader, so pgid == pid."""

    name: str
    ns: str
    argv: list[str]
    pid: int
    start_ticks: int
    log: str

    def alive(self) -> bool:
        return _start_ticks(self.pid) == self.start_ticks


STARTED_CHILDREN: dict[int, subprocess.Popen] = {}  # pid -> Popen, only in the process that started it


def stop_proc(proc: Proc, sig: int = signal.SIGTERM, timeout_s: float = 5.0) -> None:
    """Send ``sig`` to the process group of ``proc``, then SIGKILL after ``timeout_s``."""
    for s, wait_s in ((sig, timeout_s), (signal.SIGKILL, 3.0)):
        if not proc.alive():
            break
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and proc.alive():
            child = STARTED_CHILDREN.get(proc.pid)
            if child is not None:
                try:
                    child.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.05)
    child = STARTED_CHILDREN.pop(proc.pid, None)
    if child is not None:
        try:
            child.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


# --- pcap ----------------------------------------------------------------------


def read_pcap(path: str | Path) -> list[bytes]:
    """Frames of a pcap file (Ethernet link type); a truncated last record is ignored."""
    return [frame for _, frame in read_pcap_records(path)]


def read_pcap_records(path: str | Path) -> list[tuple[float, bytes]]:
    """(capture time as Unix seconds, frame) of each record of a pcap file."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise LabError(f"{path}: not a pcap file")
    (linktype,) = struct.unpack_from(endian + "I", data, 20)
    if linktype != 1:
        raise LabError(f"{path}: link type {linktype}, want 1 (Ethernet)")
    frac = 1e-9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1e-6  # nanosecond pcap
    records, off = [], 24
    rec = struct.Struct(endian + "IIII")
    while off + rec.size <= len(data):
        sec, sub, caplen, _ = rec.unpack_from(data, off)
        off += rec.size
        if off + caplen > len(data):
            break
        records.append((sec + sub * frac, data[off : off + caplen]))
        off += caplen
    return records


def ethertype_counts(frames: list[bytes]) -> dict[int, int]:
    """How many frames carry each outer EtherType."""
    counts: dict[int, int] = {}
    for f in frames:
        if len(f) >= 14:
            et = int.from_bytes(f[12:14], "big")
            counts[et] = counts.get(et, 0) + 1
    return counts


class Capture:
    """A tcpdump writing ``pcap`` until ``stop()``; started by ``Lab.capture``."""

    def __init__(self, lab: LabProcesses, proc: Proc, pcap: Path):
        self.lab, self.proc, self.pcap = lab, proc, pcap

    def frames(self) -> list[bytes]:
        """The frames captured so far (tcpdump -U writes each one as it comes)."""
        return read_pcap(self.pcap) if self.pcap.exists() else []

    def stop(self, settle_s: float = 0.3) -> Path:
        """Stop tcpdump (it flushes on SIGINT) and return the pcap path."""
        time.sleep(settle_s)
        stop_proc(self.proc, signal.SIGINT, timeout_s=5.0)
        self.lab._forget(self.proc)
        return self.pcap


def wait_listening(proc: Proc, ip: str, port: int, timeout_s: float, what: str, log_text: str = "") -> Proc:
    """Wait until ``proc`` listens on TCP ``ip:port`` (read from its /proc net/tcp);
    LabError with the end of its log if it dies or the time runs out."""
    want = f"{''.join(f'{int(o):02X}' for o in reversed(ip.split('.')))}:{port:04X}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            tcp = Path(f"/proc/{proc.pid}/net/tcp").read_text()
            if any(ln.split()[1] == want and ln.split()[3] == "0A" for ln in tcp.splitlines()[1:]):
                return proc
        except OSError:
            pass
        if not proc.alive() or time.monotonic() > deadline:
            log = Path(proc.log).read_text(errors="replace")[-3000:] if proc.log else log_text
            raise LabError(f"{what} is not listening on {ip}:{port}:\n{log}")
        time.sleep(0.1)


class LabProcesses:
    """Starting and stopping the lab's processes inside its namespaces.

    Mixed into ``Lab``, which provides ``ns()``, ``log_path()``, ``bin_dir``,
    ``procs`` and ``save()``.
    """

    def _forget(self, proc: Proc) -> None:
        if proc in self.procs:
            self.procs.remove(proc)
            self.save()

    # -- processes

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.bin_dir}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def popen(self, ns: str, argv: list[str], name: str | None = None) -> Proc:
        """Start ``argv`` in netns ``ns`` in its own session, output to its log file."""
        name = name or f"{Path(argv[0]).name}-{len(self.procs)}-{secrets.token_hex(2)}"
        log = self.log_path(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        full = ["ip", "netns", "exec", self.ns(ns), *map(str, argv)]
        with open(log, "ab") as out:
            out.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(full)}\n".encode())
            out.flush()
            child = subprocess.Popen(
                full, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=self._env(),
            )
        STARTED_CHILDREN[child.pid] = child
        ticks = _start_ticks(child.pid)
        proc = Proc(name, self.ns(ns), full, child.pid, ticks if ticks is not None else -1, str(log))
        self.procs.append(proc)
        self.save()
        return proc

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout_s: float = 5.0) -> None:
        stop_proc(proc, sig, timeout_s)
        self._forget(proc)

    def exec(
        self, ns: str, argv: list[str], timeout: float = 10.0, check: bool = False,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` in netns ``ns`` and wait at most ``timeout`` s (then kill its group)."""
        full = ["ip", "netns", "exec", self.ns(ns), *map(str, argv)]
        child = subprocess.Popen(
            full, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=self._env(),
        )
        try:
            out, err = child.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = child.communicate(timeout=5)
            raise LabError(
                f"timed out after {timeout} s in {ns}: {' '.join(map(str, argv))}\n"
                f"{out.decode(errors='replace')}{err.decode(errors='replace')}"
            ) from None
        res = subprocess.CompletedProcess(full, child.returncode, out.decode(errors="replace"),
                                          err.decode(errors="replace"))
        if check and res.returncode != 0:
            raise LabError(f"failed ({res.returncode}) in {ns}: {' '.join(map(str, argv))}\n"
                           f"{res.stdout}{res.stderr}")
        return res

    def proc(self, name: str) -> Proc | None:
        return next((p for p in self.procs if p.name == name), None)
