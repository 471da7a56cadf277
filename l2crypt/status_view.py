"""Render an agent status document (from the control socket) for people."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def render_status(doc: dict, console: Console | None = None) -> None:
    console = console or Console()
    server = doc.get("keyserver") or "none"
    state = "connected" if doc.get("connected") else "DISCONNECTED (cached keys in use)"
    console.print(f"[bold]{doc['id']}[/bold] {doc['mac']}  tap {doc['tap']} (MTU {doc['mtu']})  "
                  f"port {doc['port']} (MTU {doc['wire_mtu']})  cipher {doc['cipher']}")
    console.print(f"key server: {server}  {state}   multicast PW_ID: {doc.get('multicast_pw_id')}")
    servers = doc.get("keyservers") or []
    if servers:
        console.print("key servers: " + "  ".join(f"{s['priority']}. {s['server']} {s['state']}" for s in servers)
                      + f"   failovers: {doc.get('failovers', 0)}  failbacks: {doc.get('failbacks', 0)}")
    table = Table(title="peers", title_justify="left")
    for column in ("MAC", "ID", "PW_ID", "key age", "frames in", "frames out", "bytes in", "bytes out"):
        table.add_column(column, justify="right" if column not in ("MAC", "ID") else "left")
    for p in doc.get("peers", []):
        table.add_row(p["mac"], p["id"], str(p["pw_id"]), _age(p["key_age_s"]), str(p["frames_in"]),
                      str(p["frames_out"]), str(p["bytes_in"]), str(p["bytes_out"]))
    console.print(table)
    counters = doc.get("counters", {})
    console.print("counters: " + "  ".join(f"{k}={v}" for k, v in counters.items()))
    drops = doc.get("drops", {})
    console.print("drops: " + ("  ".join(f"{k}={v}" for k, v in sorted(drops.items())) or "none"))
    if doc.get("egress_blocked") is not None:
        console.print(f"frames blocked by the port guard: {doc['egress_blocked']}")
