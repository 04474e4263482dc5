"""The install is complete and honest: every package that the library, the harness, the notebooks, and the tests
(with the benchmarks and studies they run) import is listed, pinned, in the requirements of its part
(requirements/<part>.txt, which requirements.txt includes and pyproject.toml's extras read). A static check of the
top-level imports of every file against the distributions that provide them here (a fresh install in a new virtual
environment is too slow for a test; .ci/run does it on a fresh clone)."""
import ast
import importlib.metadata
import json
import re
import sys
from pathlib import Path

import pytest

from benchmarks.resources import requirements

ROOT = Path(__file__).resolve().parent.parent
OURS = {'heinsen_routing', 'heinsen_replication', 'train', 'models', 'benchmarks', 'studies', 'tests'}
# part -> (the files whose imports it must provide, the requirement files that provide them)
PARTS = {
    'library': (['heinsen_routing'], ['library']),
    'harness': (['heinsen_replication', 'train.py', 'models.py'], ['library', 'harness']),
    'notebooks': (['notebooks', 'studies'], ['library', 'harness', 'notebooks']),
    'tests': (['tests', 'benchmarks', 'studies', 'notebooks', 'heinsen_replication', 'train.py', 'models.py'],
              ['library', 'harness', 'notebooks', 'tests']),
}


def normalized(name):
    return re.sub(r'[-_.]+', '-', name).lower()


def code_of(path):
    """A .py file's source, or a notebook's code cells (IPython's %magic and !shell lines as `pass`)."""
    if path.suffix == '.ipynb':
        cells = [''.join(c['source']) for c in json.loads(path.read_text())['cells'] if c['cell_type'] == 'code']
        return '\n'.join(re.sub(r'^(\s*)[%!].*$', r'\1pass', cell, flags=re.M) for cell in cells)
    return path.read_text()


def imported(paths):
    """{top-level module: a file importing it} of every import statement (inside functions too) in these files."""
    found = {}
    for name in paths:
        path = ROOT / name
        files = [path] if path.is_file() else sorted([*path.rglob('*.py'), *path.rglob('*.ipynb')])
        for file in files:
            for node in ast.walk(ast.parse(code_of(file))):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                for module in modules:
                    found.setdefault(module.split('.')[0], file.relative_to(ROOT).as_posix())
    return {m: f for m, f in found.items() if m not in sys.stdlib_module_names and m not in OURS}


def test_every_requirement_is_pinned_and_listed_once():
    seen = {}
    for part in ('library', 'harness', 'notebooks', 'tests'):
        for name, line in requirements(ROOT / 'requirements' / f'{part}.txt').items():
            assert re.fullmatch(r'[\w.-]+==[\w.+-]+', line), f"requirements/{part}.txt: {line!r} is not pinned (==)"
            assert normalized(name) not in seen, f"{name} is listed in {seen[normalized(name)]} and {part}"
            seen[normalized(name)] = part
    assert set(map(normalized, requirements(ROOT / 'requirements.txt'))) == set(seen)    # everything, once


@pytest.mark.parametrize('part', PARTS)
def test_what_each_part_imports_is_in_its_requirements(part):
    files, provided_by = PARTS[part]
    listed = set()
    for name in provided_by:
        listed |= set(map(normalized, requirements(ROOT / 'requirements' / f'{name}.txt')))
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module, where in imported(files).items():
        dists = {normalized(d) for d in providers.get(module, [])}
        assert dists, f"{where} imports {module}, which no installed distribution provides"
        if not dists & listed:
            missing[module] = (sorted(dists), where)
    assert not missing, f"imported by the {part} but not in {', '.join(provided_by)}: {missing}"


def test_the_extras_are_the_requirement_files():
    """pyproject.toml's extras read requirements/<part>.txt: one list of pins, never two."""
    text = (ROOT / 'pyproject.toml').read_text()
    assert 'dependencies = ["torch>=2.4"]' in text
    for extra, files in (('harness', ['harness']), ('notebooks', ['harness', 'notebooks']),
                         ('tests', ['harness', 'notebooks', 'tests'])):
        listed = ', '.join(f'"requirements/{f}.txt"' for f in files)
        assert f'{extra} = {{file = [{listed}]}}' in text, extra
