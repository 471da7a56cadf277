"""Render a gateway status document (from its control socket) for people, and
``l2crypt-gateway status --watch`` (live rates per port)."""

from __future__ import annotations

from typing import Callable

from rich.console import Console
from rich.table import Table

from l2crypt.ops import status_view as agent_view
from l2crypt.ops.status_view import format_si

#: Port -> (frames in, frames out, bytes in, bytes out) counter names of the snapshot.
#: "in" is what arrives on the port (opened, or clear from the plain side), "out" what leaves it.
PORT_COUNTERS = {
    "encrypted": ("opened", "sealed", "bytes_opened", "bytes_sealed"),
    "tunnel": ("tunnel_opened", "tunnel_sealed", "tunnel_bytes_opened", "tunnel_bytes_sealed"),
    "plain": ("from_plain", "to_plain", "from_plain_bytes", "to_plain_bytes"),
}


def _ports(doc: dict) -> list[str]:
    ports = ["encrypted"]
    if doc.get("tunnel_listen"):
        ports.append("tunnel")
    if doc.get("plain_port"):
        ports.append("plain")
    return ports


def _port_name(doc: dict, port: str) -> str:
    return {"encrypted": doc.get("encrypted_port"), "plain": doc.get("plain_port"),
            "tunnel": doc.get("tunnel_listen")}[port] or "-"


def render_status(doc: dict, console: Console | None = None) -> None:
    console = console or Console()
    state = "connected" if doc.get("connected") else "DISCONNECTED"
    console.print(f"[bold]gateway {doc['id']}[/bold] {doc['mac']}  cipher {doc.get('cipher')}  "
                  f"up {doc.get('uptime_s', 0):g} s")
    console.print(f"key server: {doc.get('keyserver') or 'none'}  {state}   multicast PW_ID: "
                  f"{doc.get('multicast_pw_id')}   NETKEY PW_ID: {doc.get('netkey_pw_id')} "
                  f"(held {', '.join(map(str, doc.get('netkey_pw_ids_held', []))) or '-'})")
    console.print(f"tunnel peers: {', '.join(doc.get('tunnel_peers', [])) or '-'}")
    console.print(f"encrypted port path: {doc.get('wire_path') or '-'}", markup=False)
    if doc.get("tunnel_path"):
        console.print(f"tunnel path: {doc['tunnel_path']}", markup=False)
    if doc.get("plain_port"):
        reason = f" ({doc['datapath_reason']})" if doc.get("datapath_reason") else ""
        console.print(f"plain port path: {doc.get('datapath')}{reason}", markup=False)
    if "host_key" in doc:
        console.print(agent_view.host_key_line(doc), markup=False)
    c = doc.get("counters", {})
    ports = Table(title="ports", title_justify="left")
    for column in ("port", "interface", "frames in", "frames out", "bytes in", "bytes out"):
        ports.add_column(column, justify="left" if column in ("port", "interface") else "right")
    for port in _ports(doc):
        ports.add_row(port, _port_name(doc, port), *(str(c.get(k, 0)) for k in PORT_COUNTERS[port]))
    console.print(ports)
    learned = Table(title="learned MACs", title_justify="left")
    for column in ("MAC", "side", "state"):
        learned.add_column(column)
    for entry in doc.get("learned", []):
        learned.add_row(entry["mac"], entry["side"], entry["state"])
    console.print(learned)
    if doc.get("tunnel_paths"):
        console.print(paths_table(doc["tunnel_paths"]))
    hosts = Table(title="encrypted hosts", title_justify="left")
    for column in ("MAC", "ID", "PW_ID"):
        hosts.add_column(column, justify="right" if column == "PW_ID" else "left")
    for host in doc.get("hosts", []):
        hosts.add_row(host["mac"], host["id"], str(host["pw_id"]))
    console.print(hosts)
    console.print("counters: " + "  ".join(f"{k}={v}" for k, v in sorted(c.items())))
    drops = dict(doc.get("drops", {}))
    if doc.get("tunnel_unknown_sender"):
        drops["tunnel_unknown_sender"] = doc["tunnel_unknown_sender"]
    console.print("drops: " + ("  ".join(f"{k}={v}" for k, v in sorted(drops.items())) or "none"))
    for port_key, prefix in (("encrypted_port", ""), ("plain_port", "plain_")):
        line = agent_view.guard_line(doc, doc.get(port_key), prefix)
        if line:
            console.print(line)


def paths_table(paths: list[dict]) -> Table:
    """The paths of the multi-path tunnel links: state, RTT, loss, weight, bytes, key PW_ID."""
    table = Table(title="tunnel paths", title_justify="left")
    for column in ("peer", "path", "state", "RTT ms", "loss", "weight", "bytes out", "bytes in", "PW_ID"):
        table.add_column(column, justify="left" if column in ("peer", "state") else "right")
    for p in paths:
        rtt = f"{p['rtt_ms']:.2f}" if p.get("rtt_ms") is not None else "-"
        table.add_row(p["peer"], str(p["id"]), p["state"], rtt, f"{p.get('loss', 0):.1%}",
                      f"{p.get('weight', 0):.2f}", str(p.get("tx_bytes", 0)), str(p.get("rx_bytes", 0)),
                      str(p.get("pw_id") if p.get("pw_id") is not None else "-"))
    return table


# --- live rates -------------------------------------------------------------------------


def rates(before: dict, after: dict, seconds: float) -> dict:
    """Per-second rates per port between two status documents, and drops per second."""
    seconds = max(seconds, 1e-6)
    c0, c1 = before.get("counters", {}), after.get("counters", {})

    def per_s(key: str) -> float:
        return max(0, c1.get(key, 0) - c0.get(key, 0)) / seconds

    ports = {port: dict(zip(("frames_in_per_s", "frames_out_per_s", "bytes_in_per_s", "bytes_out_per_s"),
                            map(per_s, PORT_COUNTERS[port])))
             for port in _ports(after)}
    drops = sum(after.get("drops", {}).values()) - sum(before.get("drops", {}).values())
    return {"interval_s": round(seconds, 3), "ports": ports, "drops_per_s": max(0, drops) / seconds}


def rates_table(doc: dict, r: dict) -> Table:
    table = Table(title=(f"gateway {doc['id']} {doc['mac']}  key server {doc.get('keyserver') or 'none'}"
                         f"{'' if doc.get('connected') else ' (DISCONNECTED)'}  every {r['interval_s']:g} s  "
                         f"drops {r['drops_per_s']:.1f}/s"), title_justify="left")
    for column in ("port", "interface", "frames/s in", "frames/s out", "bits/s in", "bits/s out"):
        table.add_column(column, justify="left" if column in ("port", "interface") else "right")
    for port, pr in r["ports"].items():
        table.add_row(port, _port_name(doc, port), f"{pr['frames_in_per_s']:.1f}", f"{pr['frames_out_per_s']:.1f}",
                      format_si(pr["bytes_in_per_s"] * 8, "b/s"), format_si(pr["bytes_out_per_s"] * 8, "b/s"))
    return table


def watch(query: Callable[[], dict], interval_s: float, count: int, as_json: bool,
          console: Console | None = None) -> None:
    """Rates every ``interval_s`` until ``count`` refreshes (0: until Ctrl-C, which ends it quietly)."""
    agent_view.watch(query, interval_s, count, as_json, console, rates=rates, rates_table=rates_table)
