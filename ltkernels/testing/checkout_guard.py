"""Keeps a test run inside its checkout: after `forbid_sibling_reads(root)`, opening or listing anything in the
folder that holds the checkout, outside the checkout itself (a sibling folder such as `../data`), raises
PermissionError. The tests and benchmarks install it, so a file they need but the repository lacks fails CI."""
from __future__ import annotations

import os
import sys
import tempfile

_EVENTS = {"open", "os.listdir", "os.scandir"}


def forbid_sibling_reads(root) -> bool:
    """Installs the guard; False (and nothing installed) when the checkout sits directly in a folder that everything
    shares (/, the temporary folder, the home folder), where "beside the checkout" means everything."""
    root = os.path.realpath(root)
    parent = os.path.dirname(root)
    if parent in {"/", os.path.realpath(tempfile.gettempdir()), os.path.realpath(os.path.expanduser("~"))}:
        return False

    def hook(event, args):
        if event not in _EVENTS or not args or isinstance(args[0], int) or args[0] is None:
            return
        path = args[0]
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        path = os.path.realpath(os.fspath(path))
        beside = path == parent or path.startswith(parent + os.sep)
        if beside and not (path == root or path.startswith(root + os.sep)):
            raise PermissionError(f"{path} lies outside the checkout {root}: tests and benchmarks must use only "
                                  "files inside the repository")

    sys.addaudithook(hook)
    return True
