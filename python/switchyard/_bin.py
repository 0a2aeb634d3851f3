"""The binaries bundled in the wheel, and the console commands that run them."""

import os
import stat
import sys

_BIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bin")


def path(name):
    """Absolute path of the bundled binary `name` (`switchyard`, `switchyard-sim`, ...)."""
    binary = os.path.join(_BIN_DIR, name)
    if not os.path.isfile(binary):
        raise FileNotFoundError(
            f"{binary} is missing: this switchyard package was installed without its binaries"
        )
    mode = os.stat(binary).st_mode
    if not mode & stat.S_IXUSR:
        # An installer that dropped the executable bit.
        os.chmod(binary, mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return binary


def exec_binary(name, args):
    """Replaces this process with the binary (signals and the exit status are its own)."""
    binary = path(name)
    os.execv(binary, [binary, *args])


def switchyard():
    exec_binary("switchyard", sys.argv[1:])


def switchyard_sim():
    exec_binary("switchyard-sim", sys.argv[1:])


def switchyard_bench():
    exec_binary("switchyard-bench", sys.argv[1:])
