"""A throwaway PostgreSQL cluster for the ledger's PostgreSQL tests (tests/test_ledger_pg.py).

``pg_cluster`` (session-scoped) runs ``initdb`` into a temporary directory and starts
``postgres`` on a free loopback port, its unix socket in that directory, trust auth; it is
stopped and removed at the end. ``pg_url`` (per test) is a fresh database on it, as a
SQLAlchemy URL (``postgresql+psycopg://...``), so no test sees another's rows.

``MILLIWATT_TEST_PG_URL`` names an existing server to use instead (its user must be allowed
to CREATE DATABASE). Without one, and without PostgreSQL's binaries (PATH or
``/usr/lib/postgresql/*/bin``) or the psycopg driver, the tests skip saying why.
PostgreSQL refuses to run as root: as root, the cluster runs as the ``postgres`` user (or
``nobody``) through ``runuser``.

``benchmarks/ledger_load.py`` starts its cluster with ``Cluster`` too.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ENV_URL = "MILLIWATT_TEST_PG_URL"


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, else the newest /usr/lib/postgresql/<v>/bin."""
    found = shutil.which(name)
    if found:
        return found
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0)
    for d in reversed(dirs):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def unavailable() -> str | None:
    """Why a throwaway cluster cannot be started here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]'; it is in the test extra)"
    missing = [n for n in ("initdb", "pg_ctl") if pg_bin(n) is None]
    if missing:
        return f"PostgreSQL is not installed ({', '.join(missing)} not found on PATH nor in /usr/lib/postgresql/*/bin; scripts/setup.sh installs it as root)"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root without runuser: PostgreSQL refuses to run as root"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """initdb + pg_ctl start in a temporary directory; ``stop`` removes it all."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mw-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            user = "postgres" if _user_exists("postgres") else "nobody"
            pw = pwd.getpwnam(user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.prefix = ["runuser", "-u", user, "--"]
        initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        assert initdb and pg_ctl
        self.pg_ctl = pg_ctl
        self._run([initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "--locale=C"])
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=300"
        if not fsync:  # a throwaway test cluster: durability is not what these tests check
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self.opts = opts
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", self.opts, "start"])

    def halt(self) -> None:
        """Stop the server (fast shutdown: connections are cut), keeping its data: ``start`` again."""
        self._run([self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def restart(self, down_s: float = 0.0) -> None:
        """``halt`` (fast: every connection is cut), stay down ``down_s`` seconds, ``start``."""
        self.halt()
        time.sleep(down_s)
        self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def _run(self, cmd: list[str]) -> None:
        done = subprocess.run(self.prefix + cmd, capture_output=True, text=True, cwd=self.dir)
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()} {log}".strip())

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(self.prefix + [self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, cwd=self.dir)  # fmt: skip
        shutil.rmtree(self.dir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


_counter = itertools.count()


def admin(url: str, sql: str) -> None:
    """Run one statement outside a transaction (CREATE/DROP DATABASE) as the server's user."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    with psycopg.connect(host=u.host, port=u.port, user=u.username, password=u.password,
                         dbname=u.database or "postgres", autocommit=True) as conn:  # fmt: skip
        conn.execute(sql)


def fresh_database(server_url: str, prefix: str = "t") -> str:
    """A new, empty database on the server; its SQLAlchemy URL."""
    from sqlalchemy.engine import make_url

    name = f"mw_{prefix}_{os.getpid()}_{next(_counter)}"
    admin(server_url, f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[str]:
    """The URL of a PostgreSQL server (its ``postgres`` database) for this test session."""
    if os.environ.get(ENV_URL):
        yield os.environ[ENV_URL]
        return
    why = unavailable()
    if why:
        pytest.skip(why)
    cluster = Cluster()
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: str) -> Iterator[str]:
    """A fresh database for one test."""
    url = fresh_database(pg_cluster)
    yield url
    from sqlalchemy.engine import make_url

    try:
        admin(pg_cluster, f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
    except Exception:  # noqa: BLE001 - the cluster is thrown away anyway
        pass


@pytest.fixture(scope="module")
def private_pg_cluster() -> Iterator[Cluster]:
    """A throwaway cluster of the test module's own, which its tests may halt and restart
    (the session's ``pg_cluster`` is shared, and may be an existing server)."""
    why = unavailable()
    if why:
        pytest.skip(why)
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
