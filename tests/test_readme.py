"""The README's Python examples run as written, from a working directory laid out as the README's user has it:
pretrained/ (the repository's) and .data/heinsen2019/ (what `python -m data heinsen2019 --download` fetches)."""
import pathlib
import re

import pytest

from tests.helpers.files import PUBLISHED_2019

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = re.findall(r"```python\n(.*?)```", (ROOT / 'README.md').read_text(), flags=re.S)


def test_readme_has_the_examples_it_promises():
    assert any('from heinsen_routing import Routing' in e for e in EXAMPLES)          # coming from the 2019 code
    assert any('EfficientVectorRouting' in e for e in EXAMPLES) and any('record_credit' in e for e in EXAMPLES)
    assert any("pretrained/" in e for e in EXAMPLES)                                  # loading our pretrained heads


@pytest.mark.parametrize('k', range(len(EXAMPLES)))
def test_readme_example_runs(k, tmp_path, monkeypatch):
    (tmp_path / 'pretrained').symlink_to(ROOT / 'pretrained')
    if '.data/heinsen2019/' in EXAMPLES[k]:
        if PUBLISHED_2019 is None:
            pytest.skip('the published 2019 weights are not present')
        (tmp_path / '.data').mkdir()
        (tmp_path / '.data' / 'heinsen2019').symlink_to(PUBLISHED_2019)
    monkeypatch.chdir(tmp_path)
    exec(compile(EXAMPLES[k], f'README.md example {k}', 'exec'), {'__name__': f'readme_example_{k}'})
