"""
Regenerates the notebooks' figures committed under docs/ (credit_language.png, credit_vision.png,
reverse_graphics.png): runs each notebook headless (nbclient, the 'python3' kernel) as Jupyter would, from notebooks/,
with NOTEBOOK_SEED=<seed>, one thread and no network, has it write its figure into a temporary folder
(NOTEBOOK_FIGURES_DIR), and copies the figure to --out. The notebooks themselves write only to notebooks/outputs/.

credit_language draws real SST-2 test sentences from $SST_DIR or .data/sst (python -m heinsen_replication.data sst5 --download); without
the SST it falls back to hand-written sentences, a different figure. Given the seed (and the data), the figures are
the same bytes on the same machine and library versions (one thread: no
reduction order depends on scheduling; tests/test_notebooks.py checks this for one notebook).

    python -m benchmarks.figures                          # all three, seed 0, into docs/
    python -m benchmarks.figures --notebooks credit_vision --seed 1 --out /tmp/figures
"""
import argparse
import os
import pathlib
import shutil
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / 'notebooks'
FIGURES = {'credit_language': 'credit_language.png', 'credit_vision': 'credit_vision.png',
           'reverse_graphics': 'reverse_graphics.png'}


def run_notebook(name, figures_dir, seed=0, timeout=900):
    """Executes notebooks/<name>.ipynb from notebooks/ with its figures going to figures_dir -> the figure's path."""
    import nbclient
    import nbformat
    nb = nbformat.read(str(NOTEBOOKS / f'{name}.ipynb'), as_version=4)
    saved = {key: os.environ.get(key) for key in ('NOTEBOOK_FIGURES_DIR', 'NOTEBOOK_SEED', 'OMP_NUM_THREADS',
                                                  'MKL_NUM_THREADS', 'HF_HUB_OFFLINE', 'TOKENIZERS_PARALLELISM',
                                                  'PYTHONPATH')}
    os.environ.update(NOTEBOOK_FIGURES_DIR=str(figures_dir), NOTEBOOK_SEED=str(seed), OMP_NUM_THREADS='1',
                      MKL_NUM_THREADS='1', HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false',
                      PYTHONPATH=os.pathsep.join(filter(None, [str(NOTEBOOKS.parent), saved['PYTHONPATH']])))
    try:                                                               # the kernel inherits this environment
        nbclient.NotebookClient(nb, kernel_name='python3', timeout=timeout,
                                resources={'metadata': {'path': str(NOTEBOOKS)}}).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    figure = pathlib.Path(figures_dir) / FIGURES[name]
    if not figure.is_file():
        raise RuntimeError(f"notebooks/{name}.ipynb ran but wrote no {FIGURES[name]} into {figures_dir}")
    return figure


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--notebooks', nargs='+', choices=sorted(FIGURES), default=list(FIGURES))
    p.add_argument('--seed', type=int, default=0,
                   help='NOTEBOOK_SEED for every notebook (default 0: the committed figures)')
    p.add_argument('--out', default=str(ROOT / 'docs'), help='where the figures are copied (default docs/)')
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    copied = []
    for name in args.notebooks:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f'figures_{name}_') as tmp:
            figure = run_notebook(name, tmp, args.seed)
            target = os.path.join(args.out, figure.name)
            shutil.copyfile(figure, target)
        copied.append(target)
        print(f"{name}: {target} ({time.perf_counter() - started:.0f} s, seed {args.seed})")
    return copied


if __name__ == '__main__':
    main()
