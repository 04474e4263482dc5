"""The notebooks (notebooks/*.ipynb) run headless without a failing cell, start with the one documented set-up cell,
write their figures only to their output folder (never over the committed docs/*.png), and are committed with their
outputs stripped. The committed figures come from `python -m benchmarks.figures`, deterministic given the seed.

Execution uses nbclient on the 'python3' kernel (CI registers it: python -m ipykernel install --user
--name python3). The notebooks save their figures to $NOTEBOOK_FIGURES_DIR (notebooks/outputs/ by default); here
that is a tmp dir. They run from notebooks/, where Jupyter opens them, import the package heinsen_replication (the
kernel finds this checkout's: tests/conftest.py puts it on PYTHONPATH) and never change folder.
"""
import hashlib
import pathlib

import nbclient
import nbformat
import pytest

from tests.helpers.files import PUBLISHED_2019

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / 'notebooks'

# notebook -> the figure it must save
CASES = {'credit_language.ipynb': 'credit_language.png', 'credit_vision.ipynb': 'credit_vision.png',
         'reverse_graphics.ipynb': 'reverse_graphics.png'}


def read(name):
    return nbformat.read(str(NOTEBOOKS / name), as_version=4)


@pytest.mark.parametrize('name', sorted(CASES))
def test_notebook_is_stripped(name):
    nb = read(name)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == 'code'
             and (cell.get('outputs') or cell.get('execution_count') is not None)]
    assert not dirty, (f"{name}: code cells {dirty} have outputs or execution counts; strip them before "
                       f"committing (clear each code cell's outputs and set execution_count to None)")


def test_every_notebook_starts_with_the_one_set_up_cell_and_changes_neither_folder_nor_sys_path():
    first = {name: next(c.source for c in read(name).cells if c.cell_type == 'code') for name in CASES}
    assert len(set(first.values())) == 1, "the notebooks' first code cells differ"
    setup = next(iter(first.values()))
    assert "REPO = pathlib.Path('..')" in setup and 'docs/notebooks.md' in setup   # where the one way is documented
    for name in CASES:
        source = '\n'.join(c.source for c in read(name).cells)
        for never in ('%cd', 'chdir', 'sys.path', 'shared/', 'import models', 'import train'):
            assert never not in source, (name, never)


def test_notebooks_write_figures_to_their_output_folder_not_docs():
    ignored = (ROOT / '.gitignore').read_text().split()
    assert 'notebooks/outputs/' in ignored
    for name in CASES:
        source = '\n'.join(c.source for c in read(name).cells if c.cell_type == 'code')
        assert "os.environ.get('NOTEBOOK_FIGURES_DIR') or 'outputs'" in source, name
        code = '\n'.join(line.split('#')[0] for line in source.splitlines())     # comments may mention docs/
        assert 'docs' not in code, f"{name} names docs/ in its code: its figures must not go there"


@pytest.mark.slow
def test_committed_figures_are_regenerated_deterministically(tmp_path):
    """`python -m benchmarks.figures` twice with the same seed: the same bytes (credit_vision, the quickest)."""
    from benchmarks import figures
    digests = []
    for k in range(2):
        out = tmp_path / f'run{k}'
        (path,) = figures.main(['--notebooks', 'credit_vision', '--seed', '0', '--out', str(out)])
        digests.append(hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest())
    assert digests[0] == digests[1]


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(CASES))
def test_notebook_runs(name, tmp_path, monkeypatch):
    nb = read(name)
    figure = CASES[name]
    monkeypatch.setenv('NOTEBOOK_FIGURES_DIR', str(tmp_path))         # the kernel inherits the environment
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('TOKENIZERS_PARALLELISM', 'false')
    client = nbclient.NotebookClient(nb, kernel_name='python3', timeout=1200,   # per cell; a shared CPU is slow
                                     resources={'metadata': {'path': str(NOTEBOOKS)}})
    try:
        client.execute()                                              # raises CellExecutionError on a failing cell
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{name}: a cell failed:\n{e}", pytrace=False)
    saved = tmp_path / figure
    assert saved.is_file() and saved.stat().st_size > 10_000, f"{name} did not save {figure} to $NOTEBOOK_FIGURES_DIR"


@pytest.mark.slow
@pytest.mark.skipif(PUBLISHED_2019 is None, reason='the published 2019 weights are not present')
def test_reverse_graphics_real_mode_uses_the_published_model(tmp_path, monkeypatch):
    """With smallNORB test files present (here: 18 views of one object written in the real 96 x 96 format), the
    notebook trains nothing and runs the authors' published smallNORB network."""
    import numpy as np
    from heinsen_replication import data
    folder = tmp_path / 'data' / 'smallnorb'
    folder.mkdir(parents=True)
    prefix = str(folder / data.SMALLNORB_PREFIX['test'])
    rng = np.random.default_rng(0)
    data.write_smallnorb_file(f'{prefix}dat.mat', rng.integers(0, 255, (18, 2, 96, 96)).astype(np.uint8))
    data.write_smallnorb_file(f'{prefix}cat.mat', np.zeros(18, np.int32))
    info = np.stack([np.zeros(18), np.full(18, 4), np.arange(0, 36, 2), np.zeros(18)], axis=1).astype(np.int32)
    data.write_smallnorb_file(f'{prefix}info.mat', info)               # instance, elevation, azimuth, lighting
    model = PUBLISHED_2019 / 'smallNORB_pretrained_model_state_dict.pt'
    for key, value in (('NOTEBOOK_FIGURES_DIR', tmp_path), ('SMALLNORB_DATA_ROOT', tmp_path / 'data'),
                       ('SMALLNORB_MODEL', model), ('HF_HUB_OFFLINE', '1')):
        monkeypatch.setenv(key, str(value))
    nb = read('reverse_graphics.ipynb')
    nbclient.NotebookClient(nb, kernel_name='python3', timeout=600,
                            resources={'metadata': {'path': str(NOTEBOOKS)}}).execute()
    printed = ''.join(o.get('text', '') for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs)
    assert f"REAL MODE: smallNORB test files in {tmp_path / 'data' / 'smallnorb'} and the model {model}" in printed
    assert 'FIXTURE' not in printed and 'train.main' not in printed and (tmp_path / 'reverse_graphics.png').is_file()


def test_jupyter_lab_is_installed_by_the_set_up():
    """`jupyter lab`, the way the authors' README opens the notebooks, works after `pip install -r requirements.txt`
    (requirements/notebooks.txt pins it)."""
    import re
    import subprocess
    import sys
    pinned = re.search(r'^jupyterlab==(\S+)', (ROOT / 'requirements' / 'notebooks.txt').read_text(), re.M).group(1)
    out = subprocess.run([sys.executable, '-m', 'jupyter', 'lab', '--version'], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == pinned, out.stderr
