"""
The user's mistakes (a wrong argument, a missing or damaged file, a full disk, a missing package) as one type, so
that train.py reports them as one line and everything else (our bugs, the GPU's failures) keeps its traceback.
"""
import os


class UsageError(ValueError):
    """A mistake of the user's (or of their machine's: a full disk, no network), said in one line: what is wrong
    and what to do."""


def relative_to_cwd(path):
    """What an error naming a path the user gave adds: ' (relative to the current folder <cwd>)' for a relative
    path, nothing for an absolute one."""
    return '' if os.path.isabs(os.path.expanduser(str(path))) else f" (relative to the current folder {os.getcwd()})"
