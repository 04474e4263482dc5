"""The notebooks (notebooks/*.ipynb) run headless without a failing cell, and are committed with their
outputs stripped.

Execution uses nbclient on the 'python3' kernel (CI registers it: python -m ipykernel install --user
--name python3). The notebooks save their figures to $CREDIT_FIGURES_DIR (docs/ by default); here that is a
tmp dir, so running the tests leaves docs/ untouched. The notebooks locate the repository root from their
working directory, so some run from notebooks/ (as Jupyter does) and one from the repository root.
"""
import pathlib

import nbclient
import nbformat
import pytest

from tests.helpers.files import PUBLISHED_2019

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / 'notebooks'

# notebook -> (working directory it is executed in, figure it must save)
CASES = {
    'credit_language.ipynb': (NOTEBOOKS, 'credit_language.png'),
    'credit_vision.ipynb': (ROOT, 'credit_vision.png'),
    'reverse_graphics.ipynb': (NOTEBOOKS, 'reverse_graphics.png'),
}


def read(name):
    return nbformat.read(str(NOTEBOOKS / name), as_version=4)


@pytest.mark.parametrize('name', sorted(CASES))
def test_notebook_is_stripped(name):
    nb = read(name)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == 'code'
             and (cell.get('outputs') or cell.get('execution_count') is not None)]
    assert not dirty, (f"{name}: code cells {dirty} have outputs or execution counts; strip them before "
                       f"committing (clear each code cell's outputs and set execution_count to None)")


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(CASES))
def test_notebook_runs(name, tmp_path, monkeypatch):
    nb = read(name)
    cwd, figure = CASES[name]
    monkeypatch.setenv('CREDIT_FIGURES_DIR', str(tmp_path))           # the kernel inherits the environment
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('TOKENIZERS_PARALLELISM', 'false')
    client = nbclient.NotebookClient(nb, kernel_name='python3', timeout=600,
                                     resources={'metadata': {'path': str(cwd)}})
    try:
        client.execute()                                              # raises CellExecutionError on a failing cell
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{name}: a cell failed:\n{e}", pytrace=False)
    saved = tmp_path / figure
    assert saved.is_file() and saved.stat().st_size > 10_000, f"{name} did not save {figure} to $CREDIT_FIGURES_DIR"


@pytest.mark.slow
@pytest.mark.skipif(PUBLISHED_2019 is None, reason='the published 2019 weights are not present')
def test_reverse_graphics_real_mode_uses_the_published_model(tmp_path, monkeypatch):
    """With smallNORB test files present (here: 18 views of one object written in the real 96 x 96 format), the
    notebook trains nothing and runs the authors' published smallNORB network."""
    import numpy as np
    import data
    folder = tmp_path / 'data' / 'smallnorb'
    folder.mkdir(parents=True)
    prefix = str(folder / data.SMALLNORB_PREFIX['test'])
    rng = np.random.default_rng(0)
    data.write_smallnorb_file(f'{prefix}dat.mat', rng.integers(0, 255, (18, 2, 96, 96)).astype(np.uint8))
    data.write_smallnorb_file(f'{prefix}cat.mat', np.zeros(18, np.int32))
    info = np.stack([np.zeros(18), np.full(18, 4), np.arange(0, 36, 2), np.zeros(18)], axis=1).astype(np.int32)
    data.write_smallnorb_file(f'{prefix}info.mat', info)               # instance, elevation, azimuth, lighting
    model = PUBLISHED_2019 / 'smallNORB_pretrained_model_state_dict.pt'
    for key, value in (('CREDIT_FIGURES_DIR', tmp_path), ('SMALLNORB_DATA_ROOT', tmp_path / 'data'),
                       ('SMALLNORB_MODEL', model), ('HF_HUB_OFFLINE', '1')):
        monkeypatch.setenv(key, str(value))
    nb = read('reverse_graphics.ipynb')
    nbclient.NotebookClient(nb, kernel_name='python3', timeout=600,
                            resources={'metadata': {'path': str(NOTEBOOKS)}}).execute()
    printed = ''.join(o.get('text', '') for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs)
    assert f"REAL MODE: smallNORB test files in {tmp_path / 'data' / 'smallnorb'} and the model {model}" in printed
    assert 'FIXTURE' not in printed and 'train.main' not in printed and (tmp_path / 'reverse_graphics.png').is_file()


def test_jupyter_lab_is_installed_by_the_set_up():
    """`jupyter lab`, the way the authors' README opens the notebooks, works after `pip install -r requirements.txt`."""
    import re
    import subprocess
    import sys
    pinned = re.search(r'^jupyterlab==(\S+)', (ROOT / 'requirements.txt').read_text(), re.M).group(1)
    out = subprocess.run([sys.executable, '-m', 'jupyter', 'lab', '--version'], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == pinned, out.stderr
