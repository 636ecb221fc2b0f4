"""A throwaway PostgreSQL server for the tests that need one.

The server runs from the system's binaries (Debian's ``postgresql`` package; ``.ci/run`` installs it where it is
missing) on a Unix socket in a temporary directory, with no TCP port, as the ``postgres`` user where the tests run
as root (the server refuses root), and is stopped and deleted at the end.
"""

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile


def binaries():
    """The folder of ``initdb`` and ``pg_ctl``, or None."""
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
    return os.path.dirname(versions[-1]) if versions else None


@contextlib.contextmanager
def server():
    """Yields a SQLAlchemy URL of a fresh database; raises LookupError where no server can be run here."""
    bindir = binaries()
    if bindir is None:
        raise LookupError("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
    root = tempfile.mkdtemp(prefix="pyro-evidence-pg-")
    as_user = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise LookupError("running as root, and there is no 'postgres' user to run the server as") from None
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = os.path.join(root, "data")
    options = f"-p 5432 -k {root} -c listen_addresses='' -c fsync=off -c max_connections=200"
    try:
        # run from the server's own folder: the postgres user may not be able to read the tests' working directory
        subprocess.run([*as_user, f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "evidence", "--no-sync", "-E", "UTF8"],
                       check=True, capture_output=True, cwd=root)
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-o", options, "-w", "start"],
                       check=True, capture_output=True, cwd=root)
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        raise LookupError(f"the PostgreSQL server did not start: {e.stderr.decode()[-500:]}") from None
    try:
        yield f"postgresql+psycopg2://evidence@/postgres?host={root}&port=5432"
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True, cwd=root)
        shutil.rmtree(root, ignore_errors=True)
