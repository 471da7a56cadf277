"""``scripts/bench gateway``: the gateway lab's two paths beside OpenVPN-tap, in one run.

1. For every l2crypt row (``--row NAME=OPTIONS``, default one row with the
   gateway's defaults) build the gateway lab (``l2crypt.lab.gateway``: two
   encrypted segments, gateways gA and gB, plain host p1, the routed WAN),
   every ``l2crypt-gateway run`` given OPTIONS (``--agent-opts`` go to the
   agents), and set the test hosts' TAP MTU to ``bench_peers.INNER_MTU`` (as
   ``scripts/bench`` does; p1 keeps 1500).
2. For each path, h1 -> p1 (encrypted -> plain, X86) and h1 -> h3 (segment A
   -> B over the NETID tunnel): ping RTT (``--pings`` at 0.01 s, average and
   99th percentile), then one iperf3 TCP stream for ``--seconds`` with the
   CPU the gateway processes used meanwhile (``/proc``: seconds per GB
   received, and % of one core) and the receiver's ``TcpInCsumErrors``
   (nstat) over the run.
3. Then, in the same namespaces over the same links, OpenVPN 2 in tap mode
   (AES-256-GCM, tun-mtu ``INNER_MTU``) in place of l2crypt: the agents and
   gateways stopped, their port guards removed, the host stack back on the
   ports, underlay addresses on the segment ports.  Point-to-point links
   h1 <-> gA and h3 <-> gB over the segments' switches and gA <-> gB over the
   WAN; in each gateway a Linux bridge joins its OpenVPN TAPs (and gA's
   plain port).  So each path crosses the same boxes with the same number of
   seals as with l2crypt; the gateway CPU is that of the OpenVPN processes
   in gA and gB.
4. Print a table and the l2crypt/OpenVPN ratios (goals: X86 >= 1.5x, NETID
   >= 1.0x), write JSON (``bench-results/bench-gateway-TIME.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from . import bench_peers as BP
from .gateway import GATEWAYS, P1_IPV4, GatewayLab
from .segment import TAP_IFNAME, WIRE_IFNAME, LabError, install_signal_cleanup, tap_ipv4
from .support import cpu_seconds

PORT = 5211
#: name -> (source, destination, destination address)
PATHS = {"h1->p1 X86": ("h1", "p1", P1_IPV4), "h1->h3 NETID": ("h1", "h3", tap_ipv4("h3"))}
GOALS = {"h1->p1 X86": 1.5, "h1->h3 NETID": 1.0}
OPENVPN = "OpenVPN tap"
#: OpenVPN underlay: the segment ports of the hosts and gateways.
UNDERLAY = {"h1": "10.70.0.11", "gA": "10.70.0.21", "h3": "10.70.1.13", "gB": "10.70.1.22"}
OV_BRIDGE, OV_HOST_IF, OV_WAN_IF = "ovbr0", "ovh0", "ovw0"


def _gateway_procs(glab: GatewayLab, prefix: str) -> list:
    """The lab processes in gA and gB whose name starts with ``prefix``."""
    return [p for gw in GATEWAYS for p in glab.lab_of(gw).procs if p.name.startswith(prefix)]


def _csum_errors(glab: GatewayLab, role: str) -> int:
    res = glab.lab_of(role).exec(role, ["nstat", "-asz", "TcpInCsumErrors"], check=True)
    found = re.search(r"TcpInCsumErrors\s+(\d+)", res.stdout)
    return int(found.group(1)) if found else 0


def wait_reach(glab: GatewayLab, src: str, addr: str, timeout_s: float = 45.0) -> None:
    lab = glab.lab_of(src)
    deadline = time.monotonic() + timeout_s
    while lab.exec(src, ["ping", "-c", "1", "-W", "1", addr], timeout=5).returncode != 0:
        if time.monotonic() > deadline:
            raise LabError(f"{src} cannot reach {addr} within {timeout_s:g} s")
        time.sleep(0.2)


def rtt(glab: GatewayLab, src: str, addr: str, count: int) -> dict:
    res = glab.lab_of(src).exec(src, ["ping", "-c", str(count), "-i", "0.01", "-W", "2", addr],
                                timeout=count * 0.05 + 30)
    rtts = sorted(float(x) for x in re.findall(r"time=([\d.]+) ms", res.stdout))
    if not rtts:
        raise LabError(f"ping {src} -> {addr} got no replies:\n{res.stdout}{res.stderr}")
    return {"rtt_avg_ms": round(statistics.fmean(rtts), 3),
            "rtt_p99_ms": round(rtts[min(len(rtts) - 1, max(0, round(0.99 * len(rtts)) - 1))], 3),
            "ping_lost": count - len(rtts)}


def tcp(glab: GatewayLab, src: str, dst: str, addr: str, seconds: float, carriers: list) -> dict:
    """One iperf3 TCP stream ``src`` -> ``addr`` (in ``dst``), with the CPU of ``carriers``."""
    dlab, slab = glab.lab_of(dst), glab.lab_of(src)
    srv = dlab.popen(dst, ["iperf3", "-s", "-1", "--forceflush", "-B", addr, "-p", str(PORT)],
                     name=f"iperf3-bench-{dst}")
    try:
        deadline = time.monotonic() + 10
        while "listening" not in dlab.log_text(srv.name):
            if time.monotonic() > deadline or not srv.alive():
                raise LabError(f"iperf3 server in {dst} did not start:\n{dlab.log_text(srv.name)}")
            time.sleep(0.05)
        csum0 = _csum_errors(glab, dst)
        cpu0 = [cpu_seconds(p.pid, with_children=True) for p in carriers]
        t0 = time.monotonic()
        res = slab.exec(src, ["iperf3", "-c", addr, "-p", str(PORT), "-t", str(seconds), "-J"],
                        timeout=seconds + 40)
        wall = time.monotonic() - t0
        used = sum(cpu_seconds(p.pid, with_children=True) for p in carriers) - sum(cpu0)
        csum = _csum_errors(glab, dst) - csum0
    finally:
        dlab.stop(srv)
    try:
        end = json.loads(res.stdout)["end"]
        moved, bps = end["sum_received"]["bytes"], end["sum_received"]["bits_per_second"]
    except (ValueError, KeyError):
        raise LabError(f"iperf3 {src} -> {addr} failed:\n{res.stdout[-2000:]}{res.stderr[-1000:]}") from None
    return {"tcp_mbit_s": round(bps / 1e6, 1), "retransmits": end["sum_sent"].get("retransmits"),
            "gw_cpu_s_per_gb": round(used / (moved / 1e9), 2) if moved else None,
            "gw_cpu_percent": round(100 * used / wall, 1), "csum_errors": csum}


def measure_paths(glab: GatewayLab, name: str, carriers: list, args) -> dict:
    out = {}
    for path, (src, dst, addr) in PATHS.items():
        wait_reach(glab, src, addr)
        print(f"[{name}] {path}: ping x{args.pings}, iperf3 TCP {args.seconds:g} s ...", flush=True)
        out[path] = {**rtt(glab, src, addr, args.pings), **tcp(glab, src, dst, addr, args.seconds, carriers)}
    return out


def _inner_mtu(glab: GatewayLab, ifname: str) -> None:
    for host in ("h1", "h3"):
        glab.lab_of(host).exec(host, ["ip", "link", "set", ifname, "mtu", str(BP.INNER_MTU)], check=True)


def _sh(glab: GatewayLab, role: str, *commands: str) -> None:
    for command in commands:
        res = glab.lab_of(role).exec(role, ["sh", "-ec", command], timeout=20)
        if res.returncode != 0:
            raise LabError(f"{role}: {command}: {res.stdout}{res.stderr}")


def _release_port(glab: GatewayLab, role: str, port: str, address: str | None) -> None:
    """Take l2crypt's guard off ``port`` and give the host stack back (ARP on, an address)."""
    _sh(glab, role, f"nft delete table netdev l2crypt_{port}",
        f"ip link set {port} arp on", f"sysctl -qw net.ipv4.conf.{port}.arp_ignore=0",
        *([f"ip addr add {address}/24 dev {port}"] if address else []))


def to_openvpn(glab: GatewayLab, state_dir: Path) -> list:
    """Replace l2crypt by OpenVPN-tap in the same lab (module docstring, 3); returns the
    gateway-side OpenVPN processes."""
    for gw in GATEWAYS:
        glab.stop_gateway(gw, sig=15)
    for host in ("h1", "h2", "h3"):
        lab = glab.lab_of(host)
        lab.stop(lab.proc(f"agent-{host}"))
    for host in ("h1", "h3"):
        _release_port(glab, host, WIRE_IFNAME, UNDERLAY[host])
        _sh(glab, host, f"ip link del {TAP_IFNAME}")
    for gw in GATEWAYS:
        _release_port(glab, gw, WIRE_IFNAME, UNDERLAY[gw])
    _sh(glab, "gA", "nft delete table netdev l2crypt_plain0")
    certs = BP.openvpn_certs(state_dir / "openvpn", ("h1", "h3", "gA", "gB"))
    wan = {gw: GATEWAYS[gw][3] for gw in GATEWAYS}
    links = (("gA", "h1", OV_HOST_IF, UNDERLAY["gA"], UNDERLAY["h1"], 1194),
             ("gB", "h3", OV_HOST_IF, UNDERLAY["gB"], UNDERLAY["h3"], 1194),
             ("gA", "gB", OV_WAN_IF, wan["gA"], wan["gB"], 1195))
    for server, client, dev, server_ip, client_ip, port in links:
        for role, local, remote, is_server in ((server, server_ip, client_ip, True),
                                               (client, client_ip, server_ip, False)):
            ifname = dev if role in GATEWAYS else BP.OVPN_IF
            BP.start_openvpn(glab.lab_of(role), role, certs, role, ifname, local, remote, port, is_server,
                             f"openvpn-{role}-{ifname}")
    for role, ifname in (("h1", BP.OVPN_IF), ("h3", BP.OVPN_IF), ("gA", OV_HOST_IF), ("gA", OV_WAN_IF),
                         ("gB", OV_HOST_IF), ("gB", OV_WAN_IF)):
        BP.wait_link(glab.lab_of(role), role, ifname, f"openvpn-{role}-{ifname}")
    for host in ("h1", "h3"):
        _sh(glab, host, f"ip link set {BP.OVPN_IF} up", f"ip addr add {tap_ipv4(host)}/24 dev {BP.OVPN_IF}")
    for gw in GATEWAYS:
        ports = [OV_HOST_IF, OV_WAN_IF] + (["plain0"] if gw == "gA" else [])
        _sh(glab, gw, f"ip link add {OV_BRIDGE} type bridge", f"ip link set {OV_BRIDGE} up",
            *(f"ip link set {p} master {OV_BRIDGE} up" for p in ports))
    _inner_mtu(glab, BP.OVPN_IF)
    return _gateway_procs(glab, "openvpn-g")


def parse_rows(rows: list[str]) -> dict[str, list[str]]:
    """``NAME=OPTIONS`` -> {NAME: [options]}; no rows: one, ``l2crypt``, with no options."""
    out = {}
    for row in rows or ["l2crypt="]:
        name, sep, opts = row.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--row: want NAME=OPTIONS, got {row!r}")
        out[name.strip()] = opts.split()
    return out


def run_round(rows: dict[str, list[str]], agent_opts: list[str], args, base: Path) -> dict:
    results = {}
    names = list(rows)
    for i, name in enumerate(names):
        glab = GatewayLab(base / f"lab-{len(list(base.iterdir()))}",
                          gateway_args={gw: rows[name] for gw in GATEWAYS})
        for seg in glab.seg.values():
            seg.agent_args = tuple(agent_opts)
        try:
            print(f"[{name}] building the gateway lab ...", flush=True)
            glab.up(timeout_s=150)
            _inner_mtu(glab, TAP_IFNAME)
            results[name] = measure_paths(glab, name, _gateway_procs(glab, "gateway-"), args)
            results[name]["status"] = {gw: {k: v for k, v in glab.gateway_status(gw).items()
                                            if k in ("wire_path", "datapath", "datapath_reason", "tunnel_path")}
                                       for gw in GATEWAYS}
            if i == len(names) - 1 and not args.no_openvpn:
                BP.install_peers()
                print(f"[{OPENVPN}] replacing l2crypt by OpenVPN in the same lab ...", flush=True)
                results[OPENVPN] = measure_paths(glab, OPENVPN, to_openvpn(glab, glab.state_dir), args)
        finally:
            glab.down()
    return results


def median_rounds(rounds: list[dict]) -> dict:
    out = {}
    for name, paths in rounds[-1].items():
        out[name] = {}
        for path, fields in paths.items():
            if path not in PATHS:
                out[name][path] = fields
                continue
            out[name][path] = {k: (round(statistics.median(r[name][path][k] for r in rounds), 3)
                                   if isinstance(v, (int, float)) else v) for k, v in fields.items()}
    return out


def ratios(results: dict) -> dict:
    ovpn = results.get(OPENVPN)
    if not ovpn:
        return {}
    return {name: {path: {"tcp": round(r[path]["tcp_mbit_s"] / ovpn[path]["tcp_mbit_s"], 2),
                          "rtt": round(r[path]["rtt_avg_ms"] / ovpn[path]["rtt_avg_ms"], 2)}
                   for path in PATHS} for name, r in results.items() if name != OPENVPN}


def _whole(value, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    rounds = f", median of {args.rounds} rounds" if args.rounds > 1 else ""
    table = Table(title=f"gateway lab, inner MTU {BP.INNER_MTU}, iperf3 1 stream {args.seconds:g} s, "
                        f"ping x{args.pings} @ 0.01 s{rounds}")
    for col in ("path", "carrier", "TCP Mbit/s", "retr", "RTT avg ms", "RTT p99 ms",
                "gateway CPU s/GB", "gateway CPU %", "TcpInCsumErrors"):
        table.add_column(col, justify="left" if col in ("path", "carrier") else "right")
    for path in PATHS:
        for name, r in results.items():
            m = r[path]
            table.add_row(path, name, f"{m['tcp_mbit_s']:.0f}", _whole(m["retransmits"]), f"{m['rtt_avg_ms']:.3f}",
                          f"{m['rtt_p99_ms']:.3f}", _whole(m["gw_cpu_s_per_gb"], ".1f"),
                          _whole(m["gw_cpu_percent"]), _whole(m["csum_errors"]))
    Console(width=150).print(table)
    for name, by_path in ratios(results).items():
        print(f"{name} / {OPENVPN}: " + "; ".join(
            f"{path} TCP {v['tcp']}x (goal {GOALS[path]}x), RTT {v['rtt']}x" for path, v in by_path.items()))
    for name, r in results.items():
        if "status" in r:
            print(f"{name}: " + "; ".join(f"{gw} {st}" for gw, st in r["status"].items()))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bench gateway", description="The gateway lab's two paths, h1 -> p1 (X86) and h1 -> h3 (NETID), "
                                          "beside OpenVPN-tap, in one run (see l2crypt/lab/bench_gateway.py).")
    parser.add_argument("--seconds", type=float, default=10, help="iperf3 duration of each path (10)")
    parser.add_argument("--pings", type=int, default=200, help="pings at 0.01 s per path (200)")
    parser.add_argument("--rounds", type=int, default=1, help="every row this many times; medians (1)")
    parser.add_argument("--row", action="append", default=[], metavar="NAME=OPTIONS",
                        help="an l2crypt row: NAME and the l2crypt-gateway run options of both gateways, "
                             "e.g. 'ring=--wire-ring v2' (repeat; default: one row 'l2crypt', no options)")
    parser.add_argument("--agent-opts", default="", metavar="OPTIONS",
                        help="options of every host agent, e.g. '--datapath batched' (none)")
    parser.add_argument("--no-openvpn", action="store_true", help="skip the OpenVPN-tap row")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (bench-results/bench-gateway-TIME.json)")
    args = parser.parse_args(argv)
    try:
        rows = parse_rows(args.row)
    except ValueError as exc:
        parser.error(str(exc))
    if args.seconds <= 0 or args.pings <= 0 or args.rounds < 1:
        parser.error("--seconds, --pings and --rounds must be positive")
    if os.geteuid() != 0:
        print("bench gateway: must run as root (it creates network namespaces)")
        return 2
    install_signal_cleanup()
    started, load = time.time(), os.getloadavg()
    rounds = []
    try:
        with tempfile.TemporaryDirectory(prefix="l2crypt-bench-gw-") as tmp:
            for r in range(args.rounds):
                if args.rounds > 1:
                    print(f"--- round {r + 1} of {args.rounds} (load {os.getloadavg()[0]:.2f})", flush=True)
                rounds.append(run_round(rows, args.agent_opts.split(), args, Path(tmp)))
    except KeyboardInterrupt:
        print("\nbench gateway: interrupted; everything it made is removed")
        return 130
    except LabError as exc:
        print(f"bench gateway: {exc}")
        return 1
    results = median_rounds(rounds)
    print_table(results, args)
    out = args.out or Path("bench-results") / f"bench-gateway-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "args": {"seconds": args.seconds, "pings": args.pings, "rounds": args.rounds, "rows": rows,
                 "agent_opts": args.agent_opts},
        "kernel": os.uname().release, "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in load], "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "duration_s": round(time.time() - started), "results": results, "ratios": ratios(results),
        "rounds": rounds if args.rounds > 1 else None}, indent=2))
    print(f"wrote {out}")
    return 0
