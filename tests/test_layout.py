"""The repository's layout, as the imports of every module say it: the library imports nothing of the harness; the
harness's package (heinsen_replication) is rooms in a declared order, each importing only rooms below it; the doors
(train.py, models.py), benchmarks/ and studies/ import the package; nothing but the tests imports tests/."""
import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# heinsen_replication's rooms, bottom first: each imports only rooms before it ('data' is a package of its own, whose
# inner order tests/test_data.py checks)
ROOMS = ['errors', 'settings', 'recipes', 'data', 'pretrained', 'runs', 'backbones', 'models', 'standard_heads',
         'checkpoints', 'classifier', 'loaders', 'assembly', 'vision_digits', 'reporting']
OURS = {'heinsen_routing', 'heinsen_replication', 'train', 'models', 'benchmarks', 'studies', 'tests'}


def modules():
    """Every Python file of the repository (tracked, or new and not ignored) -> its module name."""
    listed = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '*.py'], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return {path: '.'.join(Path(path).with_suffix('').parts).removesuffix('.__init__') for path in listed
            if (ROOT / path).is_file()}


def imports(path, module):
    """The modules of ours that a file imports, anywhere in it (functions included), as absolute dotted names."""
    package = module.split('.') if path.endswith('__init__.py') else module.split('.')[:-1]
    found = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = '.'.join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            names = [base] + [f"{base}.{a.name}" for a in node.names]     # `from x import y`: y may be a module
        else:
            continue
        found |= {n.removesuffix('.__init__') for n in names if n.split('.')[0] in OURS}
    return found


def room(name):
    """heinsen_replication.<room>[.<inner>] -> the room's index in ROOMS; None for anything else."""
    parts = name.split('.')
    return ROOMS.index(parts[1]) if parts[0] == 'heinsen_replication' and len(parts) > 1 and parts[1] in ROOMS \
        else None


def allowed(module, name):
    """Whether module may import name (both ours)."""
    top, other = module.split('.')[0], name.split('.')[0]
    if top == 'heinsen_routing':                              # the library: itself only
        return other == 'heinsen_routing'
    if top == 'heinsen_replication':                          # a room: the library, the package, lower rooms
        mine, theirs = room(module), room(name)
        return other == 'heinsen_routing' or name == 'heinsen_replication' or theirs is not None and (
            theirs < mine or theirs == mine and (ROOT / 'heinsen_replication' / ROOMS[mine]).is_dir())   # a package
    if top in ('train', 'models'):                            # the doors: the library and the package
        return other in ('heinsen_routing', 'heinsen_replication')
    if top in ('benchmarks', 'studies'):                      # the package, the doors, the benchmarks and studies
        return other != 'tests'
    return top == 'tests'                                     # the tests: anything


def test_every_module_imports_only_what_its_layer_may():
    found = modules()
    assert {'train.py', 'models.py', 'heinsen_replication/runs.py', 'benchmarks/common.py', 'studies/glom.py',
            'tests/test_layout.py'} <= set(found)
    for path, module in sorted(found.items()):
        top = module.split('.')[0]
        assert top in OURS - {'models'} or module == 'models', f"{path}: a module outside the layout"
        if top == 'heinsen_replication' and module != 'heinsen_replication':
            assert room(module) is not None, f"{path} is in no room of ROOMS"
        if module == 'heinsen_replication':                   # its door: names of the rooms, imported when used
            assert not imports(path, module), "heinsen_replication/__init__.py imports no room when imported"
        wrong = sorted(n for n in imports(path, module) if not allowed(module, n))
        assert not wrong, f"{path} imports {wrong}"


def test_the_package_docstring_lists_the_rooms_in_their_order():
    import heinsen_replication
    listed = re.findall(r'^    (\w+) {2,}', heinsen_replication.__doc__, flags=re.M)
    assert listed == ROOMS
    assert sorted(p.stem if p.is_file() else p.name for p in (ROOT / 'heinsen_replication').iterdir()
                  if p.suffix == '.py' and p.stem != '__init__' or p.is_dir() and (p / '__init__.py').exists()) \
        == sorted(ROOMS)
