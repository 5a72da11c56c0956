"""Files and directories lb creates are root's alone: the state database (VIPs, backends, ACLs),
pins (a pinned map is writable by whoever can open it) and sockets.

Modes are set explicitly rather than through the umask, which is per process and shared by the
daemon's threads. A directory lb does not own (the parent of a --state or --api-socket the
operator chose) is created 0700 when missing but never changed when it exists."""
from __future__ import annotations

import os

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str, own: bool = True) -> None:
    """Make sure path is a directory; every one created here is 0700 (os.makedirs leaves missing
    parents to the umask), and so is path itself when it already exists and `own` says it is lb's."""
    path = os.path.abspath(path)
    missing = []
    parent = path
    while not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    for created in missing:
        os.chmod(created, DIR_MODE)
    if own:
        os.chmod(path, DIR_MODE)


def private_file(path: str) -> None:
    """Create path 0600 if missing; an existing one (lb's own) is made 0600 too."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def tighten_if_present(path: str) -> None:
    """A file another program created beside ours (SQLite's -wal and -shm): 0600 if it exists."""
    try:
        os.chmod(path, FILE_MODE)
    except FileNotFoundError:
        pass
