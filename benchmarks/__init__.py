"""
The measurements behind the README and docs/: each module is run by hand (`python -m benchmarks.<name>`) and writes
its report. The helpers below are what several reports share.
"""
import os
import shlex

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# How the reports show the folders their commands were given, where these lie outside the repository: as the
# environment variables of train_all_heads.sh and the tests, or a name for what the folder holds.
PLACEHOLDERS = {'--data_root': '$DATA_ROOT', '--feature_cache': '$FEATURE_CACHE', '--sst_dir': '$SST_DIR',
                '--runs': '$OUT/frozen-heads', '--routing_head': '$ROUTING_HEAD', '--attention_head': '$ATTENTION_HEAD',
                '--out_dir': '$OUT_DIR', '--report': '$REPORT'}


def shown_path(path, placeholder):
    """A folder as a report shows it: relative to the repository when it lies inside it, else `placeholder` (say
    '$DATA_ROOT'): the folders of the machine that measured mean nothing to a reader."""
    relative = os.path.relpath(os.path.abspath(path), REPO_ROOT)
    return placeholder if relative == '..' or relative.startswith('..' + os.sep) else relative


def shown_command(module, argv, placeholders=PLACEHOLDERS):
    """'python -m MODULE ARGV' as a report shows it: the value of each flag in placeholders through shown_path.
    argv: the command line's arguments (sys.argv[1:])."""
    shown, flag = [], None
    for arg in argv:
        name, eq, value = arg.partition('=')
        if eq and name in placeholders:                          # --flag=value
            arg = f"{name}={shown_path(value, placeholders[name])}"
        elif flag in placeholders:
            arg = shown_path(arg, placeholders[flag])
        shown.append(arg)
        flag = arg
    return ' '.join(['python -m', module, *(a if '$' in a else shlex.quote(a) for a in shown)])
