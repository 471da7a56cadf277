"""``scripts/bench keyserver``: an honest load generator for keyserverd.

1. Make a temporary state directory with a CA and ``--hosts`` enrolled hosts
   (certificate each), in the store under test: SQLite (the default) or
   PostgreSQL (a throwaway server, ``l2crypt.lab.pg_throwaway``).  Every host
   gets pair keys with ``PAIRS_PER_HOST`` x 2 neighbours beforehand
   (``make_pairs``, committed in groups).
2. Start ``keyserverd`` (``--workers``, default one per core) on 127.0.0.1.
3. Spread the hosts over ``--clients`` generator processes (default one per
   core; ``ks_load``); each opens one TLS connection per host and says hello.
   keyserverd's RSS with every host connected is measured here.
4. Open loop for ``--seconds`` at ``--rate`` requests/s in all, in the
   ``--mix`` of existing pairs, new pairs and rotations; latency runs from
   each request's scheduled time.  Reported: the rate achieved, p50, p99 and
   p99.9, errors, keyserverd's CPU per request (all workers, from /proc), the
   generator's own CPU (so a generator at its limit shows) and how busy the
   whole machine was (``busy``: with the softirqs no process is charged for,
   which carry the loopback TCP between them).
5. ``--storm``: then every host drops its connection at once and comes back
   (after a random wait up to ``--storm-jitter``, resuming its TLS session
   unless ``--no-resume``), says hello and fetches its keys again.
   Reported: the time until every host was served again, p99 during the
   storm, handshakes resumed, keyserverd's CPU for the storm.
6. Print a table and write JSON (``bench-results/bench-keyserver-TIME.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from keyserverd.store import open_store
from keyserverd.store.kek import DEFAULT_KEK_FILE, load_kek

from .ks_hosts import free_port, host_id, prepare, start_keyserverd
from .ks_load import existing_peers, serve_commands

PAIRS_PER_HOST = 2
#: Pairs made per store group while preparing.
PAIRS_PER_GROUP = 2000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def make_pairs(state: Path, store_url: str, hosts: int) -> int:
    """Every host's pair keys with its neighbours (``ks_load.existing_peers``); how many."""
    store = open_store(store_url, state, time.time(), kek=load_kek(state / DEFAULT_KEK_FILE, None))
    pairs = sorted({tuple(sorted((n, p))) for n in range(hosts)
                    for p in existing_peers(n, hosts, PAIRS_PER_HOST) if p != n})
    try:
        for start in range(0, len(pairs), PAIRS_PER_GROUP):
            with store.group():
                for a, b in pairs[start:start + PAIRS_PER_GROUP]:
                    store.get_or_create_pair_key(host_id(a), host_id(b), time.time())
    finally:
        store.close()
    return len(pairs)


def _processes(pid: int) -> list[int]:
    """keyserverd and its workers."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *map(int, children)]


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of every core since boot, from /proc/stat.
    Busy counts what no process is charged with too: the softirqs that carry
    loopback TCP between the generator and keyserverd."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Share of the machine's CPU busy between two ``machine_cpu_ticks`` readings."""
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total, 2) if total > 0 else None


def server_cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def server_rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


def percentiles(latencies: list[float]) -> dict:
    """p50, p99, p99.9 and max in ms (an unanswered request is infinitely slow)."""
    if not latencies:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    ordered = sorted(latencies)

    def pick(q: float):
        value = ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]
        return round(value * 1000, 2) if math.isfinite(value) else "lost"
    return {"p50_ms": pick(0.50), "p99_ms": pick(0.99), "p999_ms": pick(0.999), "max_ms": pick(1.0)}


class Generators:
    """The generator processes and their pipes."""

    def __init__(self, state: Path, port: int, hosts: int, clients: int):
        ctx = multiprocessing.get_context("fork")
        self.pipes, self.procs = [], []
        for index in range(clients):
            mine = list(range(index, hosts, clients))
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=serve_commands, daemon=True,
                               args=(child, state, port, mine, hosts, PAIRS_PER_HOST, index))
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    def ask(self, command: str, timeout_s: float, **args) -> list[dict]:
        for pipe in self.pipes:
            pipe.send((command, args))
        answers = []
        for pipe in self.pipes:
            if not pipe.poll(timeout_s):
                raise RuntimeError(f"a generator process did not finish {command} within {timeout_s:g} s")
            answer = pipe.recv()
            if "error" in answer:
                raise RuntimeError(f"a generator process failed in {command}: {answer['error']}")
            answers.append(answer)
        return answers

    def stop(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("stop", {}))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def measure(store_name: str, store_url: str, args) -> dict:
    state = Path(tempfile.mkdtemp(prefix="l2c-ksbench-"))
    proc = generators = None
    result: dict = {"store": store_name, "hosts": args.hosts, "workers": args.workers, "clients": args.clients}
    try:
        started = time.monotonic()
        prepare(state, args.hosts, store_url)
        result["pairs_before"] = make_pairs(state, store_url, args.hosts)
        result["prepare_s"] = round(time.monotonic() - started, 1)
        port = free_port()
        proc = start_keyserverd(state, port, store_url, (
            "--workers", str(args.workers), "--max-connections", str(args.hosts + 1024),
            "--max-connections-per-host", "8"))
        pids = _processes(proc.pid)
        generators = Generators(state, port, args.hosts, args.clients)
        started = time.monotonic()
        up = generators.ask("connect", 600)
        result["connected"] = sum(a["connected"] for a in up)
        result["connect_s"] = round(time.monotonic() - started, 1)
        if result["connected"] < args.hosts:
            raise RuntimeError(f"only {result['connected']} of {args.hosts} hosts connected: "
                               f"{next(a['first_error'] for a in up if a['first_error'])}")
        time.sleep(1.0)
        result["server_rss_mib_connected"] = server_rss_mib(pids)

        cpu0, start, machine0 = server_cpu_s(pids), time.monotonic() + 0.5, machine_cpu_ticks()
        runs = generators.ask("run", args.seconds + 120, start=start, seconds=args.seconds,
                              rate=args.rate / args.clients, mix=args.mix)
        cpu, machine = server_cpu_s(pids) - cpu0, machine_cpu_ticks()
        latencies = [x for r in runs for x in r["latencies"]]
        answered = sum(1 for x in latencies if math.isfinite(x))
        window = max(r["sent_s"] for r in runs)
        errors: dict = {}
        for r in runs:
            for code, count in r["errors"].items():
                errors[code] = errors.get(code, 0) + count
        result.update({
            "offered_per_s": args.rate, "seconds": args.seconds, "requests": len(latencies),
            "answered": answered, "achieved_per_s": round(answered / window, 1) if window else None,
            **percentiles(latencies), "errors": errors,
            "mix": {k: sum(r["kinds"][k] for r in runs) for k in ("existing", "new", "rotate")},
            "server_cpu_s": round(cpu, 2), "server_cpu_us_per_request": round(cpu / answered * 1e6, 1)
            if answered else None,
            "generator_cpu_cores": round(sum(r["cpu_s"] for r in runs) / window, 2) if window else None,
            "generator_max_behind_ms": round(max(r["max_behind_s"] for r in runs) * 1000, 1),
            "machine_busy": busy_share(machine0, machine),
            "server_rss_mib": server_rss_mib(pids),
        })
        if args.storm:
            cpu0, at = server_cpu_s(pids), time.monotonic() + 0.5
            storms = generators.ask("storm", 300, at=at, jitter_s=args.storm_jitter, resume=args.resume)
            served = [x for s in storms for x in s["served_after"]]
            result["storm"] = {
                "hosts": args.hosts, "jitter_s": args.storm_jitter, "resume": args.resume,
                "served": len(served), "failed": sum(s["failed"] for s in storms),
                "all_served_s": round(max(served), 2) if len(served) == args.hosts else None,
                "served_p50_s": round(sorted(served)[len(served) // 2], 2) if served else None,
                "resumed": sum(s["resumed"] for s in storms),
                **percentiles([x for s in storms for x in s["latencies"]]),
                "server_cpu_s": round(server_cpu_s(pids) - cpu0, 2),
                "generator_cpu_s": round(sum(s["cpu_s"] for s in storms), 2),
                "server_rss_mib": server_rss_mib(pids),
            }
        return result
    finally:
        if generators is not None:
            generators.stop()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except Exception:
                proc.kill()
        shutil.rmtree(state, ignore_errors=True)


def _mix(text: str) -> tuple[float, float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise argparse.ArgumentTypeError("want EXISTING,NEW,ROTATE weights, e.g. 80,10,10")
    return tuple(parts)


def _percent(share: float | None) -> str:
    return "?" if share is None else f"{share:.0%}"


def _print(results: list[dict]) -> None:
    print(f"{'store':<11}{'hosts':>7}{'wk':>3}{'offered':>9}{'achieved':>10}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'p99.9 ms':>9}{'srv us/req':>11}{'gen cores':>10}{'busy':>6}{'RSS MiB':>9}")
    for r in results:
        print(f"{r['store']:<11}{r['hosts']:>7}{r['workers']:>3}{r['offered_per_s']:>9}{r['achieved_per_s']:>10}"
              f"{r['p50_ms']:>8}{r['p99_ms']:>8}{r['p999_ms']:>9}{r['server_cpu_us_per_request']:>11}"
              f"{r['generator_cpu_cores']:>10}{_percent(r['machine_busy']):>6}{r['server_rss_mib_connected']:>9}")
        if r["errors"]:
            print(f"  errors: {r['errors']}")
        storm = r.get("storm")
        if storm:
            print(f"  storm: {storm['served']}/{storm['hosts']} served, all after {storm['all_served_s']} s "
                  f"(median {storm['served_p50_s']} s), p99 {storm['p99_ms']} ms, resumed {storm['resumed']}, "
                  f"failed {storm['failed']}, server CPU {storm['server_cpu_s']} s")


def main(argv: list[str]) -> int:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(prog="bench keyserver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", "--agents", type=int, default=200, help="simulated hosts (200)")
    parser.add_argument("--rate", type=float, default=1000, help="requests per second offered, open loop (1000)")
    parser.add_argument("--seconds", type=float, default=10, help="measuring time per store (10)")
    parser.add_argument("--mix", type=_mix, default=(80.0, 10.0, 10.0),
                        help="weights of existing-pair requests, new pairs, rotations (80,10,10)")
    parser.add_argument("--workers", type=int, default=cores, help=f"keyserverd workers ({cores})")
    parser.add_argument("--clients", type=int, default=cores, help=f"generator processes ({cores})")
    parser.add_argument("--storm", action="store_true", help="then drop every connection at once and reconnect")
    parser.add_argument("--storm-jitter", type=float, default=1.0, help="most a host waits before it reconnects (1.0)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="storm: full TLS handshakes, no session resumption")
    parser.add_argument("--store", choices=("sqlite", "postgresql", "both"), default="sqlite")
    parser.add_argument("--out", type=Path, default=None, help="JSON output file")
    args = parser.parse_args(argv)
    if args.hosts < 2 * PAIRS_PER_HOST + 2:
        parser.error(f"--hosts: at least {2 * PAIRS_PER_HOST + 2}")
    if args.clients < 1 or args.workers < 1 or args.rate <= 0:
        parser.error("--clients, --workers and --rate must be positive")
    results = []
    if args.store in ("sqlite", "both"):
        results.append(measure("sqlite", "", args))
    if args.store in ("postgresql", "both"):
        from .pg_throwaway import PgServer, unavailable_reason

        reason = unavailable_reason()
        if reason:
            print(f"bench keyserver: skipping PostgreSQL: {reason}", file=sys.stderr)
        else:
            pg = PgServer.from_env()
            try:
                results.append(measure("postgresql", pg.create_database(), args))
            finally:
                pg.stop()
    _print(results)
    out = args.out or Path("bench-results") / f"bench-keyserver-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"argv": argv, "cores": os.cpu_count(), "results": results}, indent=2))
    print(f"wrote {out}")
    return 0
