"""The notebooks (notebooks/*.ipynb) run headless without a failing cell, and are committed with their
outputs stripped.

Execution uses nbclient on the 'python3' kernel (CI registers it: python -m ipykernel install --user
--name python3). The notebooks save their figures to $CREDIT_FIGURES_DIR (docs/ by default); here that is a
tmp dir, so running the tests leaves docs/ untouched. The notebooks locate the repository root from their
working directory, so some run from notebooks/ (as Jupyter does) and one from the repository root.
"""
import os
import pathlib

import nbclient
import nbformat
import pytest

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
