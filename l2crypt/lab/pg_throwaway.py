"""A throwaway PostgreSQL server for tests and benchmarks.

1. ``PgServer.from_env()`` uses ``$L2CRYPT_TEST_PG_URL`` (an admin URL of a
   running server that may CREATE DATABASE) when it is set; otherwise it runs
   ``initdb`` and ``pg_ctl`` from Debian's ``postgresql`` package in a new
   temporary directory, as the ``postgres`` user when we are root.  The server
   listens only on a Unix socket in that directory (no TCP port), so it works
   from every network namespace of the lab.
2. ``create_database()`` returns the URL of a new empty database;
   ``drop_database(url)`` removes it.
3. ``stop()`` stops a server it started (``-m immediate``) and removes its
   directory.  ``unavailable_reason()`` says why none can be had, or None.
4. For restart tests, on a server it started: ``crash()`` stops it like a
   power cut (``pg_ctl stop -m immediate``: no checkpoint, every connection
   dropped) and keeps the data directory; ``start_again()`` starts it on the
   same data, so it recovers from its WAL.  ``dump(url)`` is ``pg_dump``'s
   plain SQL of one database.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ENV_URL = "L2CRYPT_TEST_PG_URL"
START_TIMEOUT_S = 60


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def unavailable_reason() -> str | None:
    if os.environ.get(ENV_URL):
        return None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg 3 is not installed"
    if _pg_bin("initdb") is None or _pg_bin("pg_ctl") is None:
        return f"no PostgreSQL server binaries (apt-get install postgresql) and no ${ENV_URL}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no postgres user to run initdb as"
    return None


class PgServer:
    """A PostgreSQL server for tests: a running one named by an admin URL, or a throwaway one
    this object initdb's, starts and removes."""

    def __init__(self, admin_url: str, directory: Path | None = None, pg_ctl: list[str] | None = None,
                 start_args: list[str] | None = None):
        self.admin_url = admin_url
        self.directory = directory
        self._pg_ctl = pg_ctl
        self._start_args = start_args or []

    @classmethod
    def from_env(cls) -> "PgServer":
        url = os.environ.get(ENV_URL)
        if url:
            return cls(url)
        return cls.start()

    @classmethod
    def start(cls) -> "PgServer":
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        directory = Path(tempfile.mkdtemp(prefix="l2c-pg-"))
        as_user: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(directory, pw.pw_uid, pw.pw_gid)
            as_user = ["runuser", "-u", "postgres", "--"]
        data, sock = directory / "data", directory
        subprocess.run(as_user + [_pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                                  "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, timeout=START_TIMEOUT_S)
        pg_ctl = as_user + [_pg_bin("pg_ctl"), "-D", str(data)]
        options = f"-c listen_addresses='' -k {sock} -c max_connections=400 -c shared_buffers=32MB"
        server = cls(f"postgresql://postgres@/postgres?host={sock}", directory, pg_ctl,
                     ["-w", "-t", str(START_TIMEOUT_S), "-o", options, "-l", str(directory / "server.log"), "start"])
        try:
            server.start_again()
        except RuntimeError:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return server

    def start_again(self) -> None:
        """Start the server (again) on its data directory."""
        try:
            subprocess.run(self._pg_ctl + self._start_args, check=True, capture_output=True,
                           timeout=START_TIMEOUT_S + 10)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            path = self.directory / "server.log"
            log = path.read_text(errors="replace") if path.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {exc}\n{log[-2000:]}") from None

    def crash(self) -> None:
        """Stop at once, as a crash would (connections dropped, recovery at the next start)."""
        if self._pg_ctl is None:
            raise RuntimeError("not a server started here (L2CRYPT_TEST_PG_URL)")
        subprocess.run(self._pg_ctl + ["-m", "immediate", "-w", "-t", "30", "stop"],
                       check=True, capture_output=True, timeout=60)

    def dump(self, url: str) -> bytes:
        """``pg_dump`` (plain SQL, data included) of the database at ``url``."""
        return subprocess.run([_pg_bin("pg_dump"), "--no-owner", "-d", url], check=True,
                              capture_output=True, timeout=60).stdout

    def _with_db(self, name: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path=f"/{name}"))

    def create_database(self) -> str:
        import psycopg

        name = f"l2c_{secrets.token_hex(6)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self._with_db(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = urlsplit(url).path.lstrip("/")
        if not name.startswith("l2c_"):
            return
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        if self._pg_ctl is not None:
            subprocess.run(self._pg_ctl + ["-m", "immediate", "-w", "-t", "30", "stop"],
                           capture_output=True, timeout=60)
            self._pg_ctl = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
