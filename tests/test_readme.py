"""The README's Python examples run as written."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), '..', 'README.md')
EXAMPLES = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)


def test_readme_has_examples():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize('k', range(len(EXAMPLES)))
def test_readme_example_runs(k):
    exec(compile(EXAMPLES[k], f'README.md example {k}', 'exec'), {'__name__': f'readme_example_{k}'})
