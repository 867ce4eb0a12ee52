"""A throwaway PostgreSQL server (Debian's package, `make postgres`) on a free loopback port.

initdb into a temporary folder, pg_ctl start on 127.0.0.1 with trust
authentication, and pg_ctl stop (then the folder removed) however the tests
end. PostgreSQL refuses to run as root: as root, the server runs as the
package's `postgres` user. Tests skip where no PostgreSQL is installed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.service_process import free_port

START_TIMEOUT_S = 60


def postgres_bin() -> Path | None:
    """The newest installed server's bin folder (`/usr/lib/postgresql/<major>/bin`)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_major)
    return Path(found[-1]).parent if found else None


def _major(path: str) -> int:
    return int(Path(path).parts[-3])


@dataclass(frozen=True)
class PostgresServer:
    port: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a fresh, empty database on this server."""
        import psycopg

        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed: make postgres")
    root = Path(tempfile.mkdtemp(prefix="sdxl-pg-"))
    data = root / "data"
    user = "postgres" if os.geteuid() == 0 else None
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    run_as = ["runuser", "-u", user, "--"] if user is not None else []
    port = free_port()
    log = root / "server.log"
    try:
        subprocess.run(
            [*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
            check=True,
            capture_output=True,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
        pg_ctl = [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data)]
        start = [*pg_ctl, "-l", str(log), "-o", options, "-w", "-t", str(START_TIMEOUT_S), "start"]
        subprocess.run(start, check=True, capture_output=True)
        try:
            yield PostgresServer(port)
        finally:
            subprocess.run([*pg_ctl, "-m", "immediate", "stop"], check=False, capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
