"""A throwaway PostgreSQL 15 server for the tests (Debian's binaries), and its session fixture.

One server per test session (``initdb`` takes seconds), one database per test
(``create_database``). It listens on 127.0.0.1 only, on a free port, with its
unix socket in its own temporary folder; ``stop()`` and ``start()`` keep the
data folder and the port, so that a test can take the database away mid-load
and bring it back. ``initdb`` and ``postgres`` refuse to run as root: as root
(CI) they run as the ``postgres`` user through ``runuser``, otherwise directly.

tests/conftest.py imports the session fixture ``postgres_server``, so every
test module shares the one server; it starts only when a test asks for it.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile

import pytest

from tests.procs import free_port

BIN = "/usr/lib/postgresql/15/bin"
USER = "app"
DATABASE_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _clean_env() -> dict[str, str]:
    """The environment without a developer's PG* settings (PGHOST, PGOPTIONS…), which would redirect psql."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class PostgresServer:
    """``initdb`` (trust authentication, superuser ``app``) in a new temporary folder, then ``start()``."""

    def __init__(self):
        if not os.access(os.path.join(BIN, "initdb"), os.X_OK):
            raise AssertionError("PostgreSQL 15 is not installed (%s/initdb): run .ci/system-deps" % BIN)
        self.as_postgres = os.geteuid() == 0
        # Not under pytest's tmp_path: its parents are private to root, and the server runs as postgres.
        self.temp = tempfile.mkdtemp(prefix="pg-test-")
        self.data = os.path.join(self.temp, "data")
        self.log_path = os.path.join(self.temp, "postgres.log")
        self.port = free_port()
        self.running = False
        try:
            if self.as_postgres:
                entry = pwd.getpwnam("postgres")
                os.chown(self.temp, entry.pw_uid, entry.pw_gid)
            self._run(
                "initdb", "-D", self.data, "-A", "trust", "-U", USER, "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"
            )
            self.start()
        except BaseException:
            self.cleanup()
            raise

    def _run(self, program: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        command = [os.path.join(BIN, program), *args]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(
            command, cwd=self.temp, env=_clean_env(), capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise AssertionError(
                "%s failed (%d): %s%s\n%s" % (program, result.returncode, result.stdout, result.stderr, self.log())
            )
        return result

    def url_of(self, database: str) -> str:
        return "postgresql://%s@127.0.0.1:%d/%s" % (USER, self.port, database)

    @property
    def url(self) -> str:
        """The server's own ``postgres`` database; tests use ``create_database``."""
        return self.url_of("postgres")

    def start(self) -> None:
        """Start (or start again) on the same data folder and port; returns once it accepts connections."""
        options = "-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off" % (
            self.port,
            shlex.quote(self.temp),
        )
        self._run("pg_ctl", "-D", self.data, "-l", self.log_path, "-o", options, "-w", "-t", "30", "start")
        self.running = True

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: open sessions are ended, their transactions rolled back."""
        if self.running:
            self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "30", "stop")
            self.running = False

    def psql(self, sql: str, database: str = "postgres") -> str:
        """One statement (or several) through psql over TCP; its unaligned output without headers."""
        result = subprocess.run(
            [os.path.join(BIN, "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
            + ["-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d", database, "-c", sql],
            env={**_clean_env(), "PGCONNECT_TIMEOUT": "5"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise AssertionError("psql %r failed: %s" % (sql, result.stderr))
        return result.stdout.strip()

    def create_database(self, name: str, icu_locale: str | None = None) -> str:
        """A new empty database; its URL. ``icu_locale`` (e.g. ``en-US``): its collation, else the server's (C)."""
        assert DATABASE_NAME_RE.match(name), name
        locale = ""
        if icu_locale is not None:
            assert re.match(r"^[A-Za-z0-9_-]+$", icu_locale), icu_locale
            locale = " TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE '%s'" % icu_locale
        self.psql('CREATE DATABASE "%s"%s' % (name, locale))
        return self.url_of(name)

    def drop_database(self, name: str) -> None:
        assert DATABASE_NAME_RE.match(name), name
        self.psql('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        """Stop the server if it runs, and delete its folder."""
        try:
            self.stop()
        except AssertionError:
            # A fast stop that did not finish: no server may outlive the tests.
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "-t", "30", "stop")
            self.running = False
        finally:
            shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer()
    try:
        yield server
    finally:
        server.cleanup()
