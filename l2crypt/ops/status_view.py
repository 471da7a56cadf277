"""Render an agent status document (from the control socket) for people."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def format_age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def host_key_line(doc: dict) -> str:
    """``host key: file (mutual TLS)`` or ``host key: token '...' (...; challenge)``."""
    if doc.get("host_key") == "token":
        return f"host key: {doc.get('host_key_token', 'token')}; authenticated by challenge"
    return "host key: file (host.key, mutual TLS)"


def render_status(doc: dict, console: Console | None = None) -> None:
    console = console or Console()
    server = doc.get("keyserver") or "none"
    state = "connected" if doc.get("connected") else "DISCONNECTED (cached keys in use)"
    mtu = str(doc["mtu"])
    if doc.get("mtu_expected") not in (None, doc["mtu"]):
        mtu += f", [bold red]should be {doc['mtu_expected']}[/bold red] = wire MTU - 32"
    console.print(f"[bold]{doc['id']}[/bold] {doc['mac']}  tap {doc['tap']} (MTU {mtu})  "
                  f"port {doc['port']} (MTU {doc['wire_mtu']})  cipher {doc['cipher']}")
    if "datapath" in doc:
        reason = doc.get("datapath_reason")
        console.print(f"datapath: {doc['datapath']}" + (f" ({reason})" if reason else ""), markup=False)
    if "wire_path" in doc:
        console.print(f"wire port: {doc['wire_path']}", markup=False)
    if "host_key" in doc:
        console.print(host_key_line(doc), markup=False)
    console.print(f"key server: {server}  {state}   multicast PW_ID: {doc.get('multicast_pw_id')}")
    servers = doc.get("keyservers") or []
    if servers:
        console.print("key servers: " + "  ".join(f"{s['priority']}. {s['server']} {s['state']}" for s in servers)
                      + f"   failovers: {doc.get('failovers', 0)}  failbacks: {doc.get('failbacks', 0)}")
    table = Table(title="peers", title_justify="left")
    for column in ("MAC", "ID", "PW_ID", "key age", "frames in", "frames out", "bytes in", "bytes out"):
        table.add_column(column, justify="right" if column not in ("MAC", "ID") else "left")
    for p in doc.get("peers", []):
        table.add_row(p["mac"], p["id"], str(p["pw_id"]), format_age(p["key_age_s"]), str(p["frames_in"]),
                      str(p["frames_out"]), str(p["bytes_in"]), str(p["bytes_out"]))
    console.print(table)
    counters = doc.get("counters", {})
    console.print("counters: " + "  ".join(f"{k}={v}" for k, v in counters.items()))
    drops = doc.get("drops", {})
    console.print("drops: " + ("  ".join(f"{k}={v}" for k, v in sorted(drops.items())) or "none"))
    line = guard_line(doc, doc.get("port"))
    if line:
        console.print(line)


GUARD_STATES = {"intact": "intact", "altered": "[bold red]ALTERED[/bold red] (not as installed)",
                "missing": "[bold red]MISSING[/bold red] (plain frames pass)"}


def guard_line(doc: dict, port: str | None, prefix: str = "") -> str | None:
    """The port guard of a status document in one line (keys ``<prefix>port_guard``,
    ``<prefix>inbound_refused``, ``<prefix>egress_blocked``); None if it has none."""
    state = doc.get(f"{prefix}port_guard")
    if state is None:
        return None
    parts = [f"port guard on {port or '-'}: {GUARD_STATES.get(state, state)}"]
    for key, label in (("inbound_refused", "frames refused inbound"), ("egress_blocked", "frames blocked outbound")):
        if doc.get(prefix + key) is not None:
            parts.append(f"{label}: {doc[prefix + key]}")
    return "   ".join(parts)


# --- live rates (``l2crypt status --watch``) -------------------------------------------

RATE_FIELDS = ("frames_in", "frames_out", "bytes_in", "bytes_out")


def rates(before: dict, after: dict, seconds: float) -> dict:
    """Per-second rates between two status documents: totals and per peer MAC."""
    seconds = max(seconds, 1e-6)
    old_peers = {p["mac"]: p for p in before.get("peers", [])}
    peers = {}
    for p in after.get("peers", []):
        old = old_peers.get(p["mac"], {})
        peers[p["mac"]] = {
            "id": p["id"],
            **{f"{k}_per_s": max(0, p[k] - old.get(k, p[k])) / seconds for k in RATE_FIELDS},
        }
    c0, c1 = before.get("counters", {}), after.get("counters", {})
    total = {f"{k}_per_s": max(0, c1.get(k, 0) - c0.get(k, 0)) / seconds
             for k in ("sealed", "opened", "bytes_sealed", "bytes_opened")}
    drops = sum(after.get("drops", {}).values()) - sum(before.get("drops", {}).values())
    total["drops_per_s"] = max(0, drops) / seconds
    return {"interval_s": round(seconds, 3), "total": total, "peers": peers}


def format_si(value: float, unit: str) -> str:
    for prefix in ("", "k", "M", "G"):
        if abs(value) < 1000 or prefix == "G":
            return f"{value:.1f} {prefix}{unit}"
        value /= 1000
    return f"{value:.1f} {unit}"


def rates_table(doc: dict, r: dict) -> Table:
    t = r["total"]
    table = Table(title=(f"{doc['id']} {doc['mac']}  key server {doc.get('keyserver') or 'none'}"
                         f"{'' if doc.get('connected') else ' (DISCONNECTED)'}  every {r['interval_s']:g} s   "
                         f"sealed {format_si(t['sealed_per_s'], 'f/s')} ({format_si(t['bytes_sealed_per_s'] * 8, 'b/s')})  "
                         f"opened {format_si(t['opened_per_s'], 'f/s')} ({format_si(t['bytes_opened_per_s'] * 8, 'b/s')})  "
                         f"drops {t['drops_per_s']:.1f}/s"),
                  title_justify="left")
    for column in ("MAC", "ID", "PW_ID", "key age", "frames/s in", "frames/s out", "bits/s in", "bits/s out"):
        table.add_column(column, justify="left" if column in ("MAC", "ID") else "right")
    for p in doc.get("peers", []):
        pr = r["peers"].get(p["mac"])
        if pr is None:
            continue
        table.add_row(p["mac"], p["id"], str(p["pw_id"]), format_age(p["key_age_s"]),
                      f"{pr['frames_in_per_s']:.1f}", f"{pr['frames_out_per_s']:.1f}",
                      format_si(pr["bytes_in_per_s"] * 8, "b/s"), format_si(pr["bytes_out_per_s"] * 8, "b/s"))
    return table


def watch(query, interval_s: float, count: int, as_json: bool, console: Console | None = None,
          rates=rates, rates_table=rates_table) -> None:
    """Show rates every ``interval_s`` until ``count`` refreshes (0: until Ctrl-C).

    ``query()`` returns a status document; ``rates(before, after, seconds)``
    and ``rates_table(doc, rates)`` turn two of them into figures and a table
    (the agent's by default; the gateway passes its own).  Ctrl-C ends it quietly.
    """
    import json
    import time

    from rich.live import Live

    console = console or Console()
    before, t0 = query(), time.monotonic()
    shown = 0
    live = None if as_json else Live(console=console, auto_refresh=False, transient=False)
    try:
        if live is not None:
            live.start()
        while count == 0 or shown < count:
            time.sleep(interval_s)
            after, t1 = query(), time.monotonic()
            r = rates(before, after, t1 - t0)
            if as_json:
                print(json.dumps(r, sort_keys=True), flush=True)
            else:
                live.update(rates_table(after, r), refresh=True)
            before, t0 = after, t1
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
