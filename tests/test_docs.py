"""The documentation: every ```python snippet of README.md and docs/*.md runs as written, from a working directory
laid out as the user has it (pretrained/, the repository's, and .data/heinsen2019/, what `python -m heinsen_replication.data heinsen2019
--download` fetches); the README is the front door it promises to be; every relative link points at a file.

Snippets that cannot run here (they need the Hugging Face hub or a file not in the repository) are fenced as
```python-hub, with a comment saying what they need; they are not executed, and they are counted (at most one)."""
import pathlib
import re

import pytest

from tests.helpers.files import PUBLISHED_2019

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
FENCE = re.compile(r"^```(python[\w-]*)\n(.*?)^```", flags=re.S | re.M)


def snippets(page, language='python'):
    return [code for lang, code in FENCE.findall(page.read_text()) if lang == language]


EXAMPLES = [(page.relative_to(ROOT).as_posix(), k, code)
            for page in PAGES for k, code in enumerate(snippets(page))]
README = (ROOT / 'README.md').read_text()
ALL_EXAMPLES = '\n'.join(code for _, _, code in EXAMPLES)


def test_the_docs_have_the_examples_they_promise():
    assert 'from heinsen_routing import Routing' in ALL_EXAMPLES                    # coming from the 2019 code
    assert 'EfficientVectorRouting' in ALL_EXAMPLES and 'record_credit' in ALL_EXAMPLES
    assert 'DefinableVectorRouting' in ALL_EXAMPLES and 'GenerativeMatrixRouting' in ALL_EXAMPLES
    assert "pretrained/" in ALL_EXAMPLES                                             # loading our pretrained heads
    assert '.data/heinsen2019/' in ALL_EXAMPLES                                      # loading the authors' 2019 files


def test_the_readme_is_the_front_door():
    lines = README.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; at most 250 (move details to docs/)"
    first = '\n'.join(lines[:30])
    example = re.search(r"```python\n(.*?)```", first, flags=re.S)
    assert example and 'EfficientVectorRouting' in example.group(1) and 'print(' in example.group(1)
    for heading in ('## Contents', '## Install', '## Pick your path', '## Results', '## FAQ', '## Citation',
                    '## License'):
        assert heading in README, heading
    assert '@misc{heinsen2022' in README and '@misc{heinsen2019' in README
    assert 'docs/results.md' in README and 'download one file' in README
    install = re.search(r"## Install\n[^#]*?```\n(.*?)```", README, flags=re.S).group(1)
    assert 'pip install -r requirements.txt' in install and 'pip install -e .' in install
    assert 'jupyter lab' not in install.strip().splitlines()[-1]                     # nothing that blocks the shell
    assert (ROOT / 'LICENSE').is_file() and (ROOT / 'CITATION.cff').is_file() and (ROOT / 'CHANGELOG.md').is_file()


def test_the_docs_index_lists_every_page():
    index = (ROOT / 'docs' / 'README.md').read_text()
    for page in PAGES[1:]:
        if page.name != 'README.md':
            assert f'({page.name})' in index, f"docs/README.md does not link {page.name}"


def anchors(page):
    """The anchors GitHub makes of a markdown page's headings: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"^```.*?^```", '', page.read_text(), flags=re.S | re.M)          # no headings in code blocks
    return {re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')
            for heading in re.findall(r'^#+ (.*)$', text, flags=re.M)}


def test_relative_links_point_at_files_and_headings():
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if re.match(r'[a-z]+://', target) or target.startswith('mailto:'):
                continue
            linked = (page.parent / target) if target else page
            assert linked.exists(), f"{page.relative_to(ROOT)} links {target}, which does not exist"
            if anchor and linked.suffix == '.md':
                assert anchor in anchors(linked), f"{page.relative_to(ROOT)} links {target}#{anchor}: no such heading"


def test_snippets_that_are_not_run_are_few_and_say_why():
    skipped = [(page.name, code) for page in PAGES for lang, code in FENCE.findall(page.read_text())
               if lang != 'python']
    assert len(skipped) <= 1, [name for name, _ in skipped]
    for name, code in skipped:
        assert code.lstrip().startswith('# needs '), f"{name}: a snippet that is not run says what it needs first"


@pytest.mark.parametrize('page,k,code', EXAMPLES, ids=[f'{page}:{k}' for page, k, _ in EXAMPLES])
def test_example_runs(page, k, code, tmp_path, monkeypatch):
    (tmp_path / 'pretrained').symlink_to(ROOT / 'pretrained')
    if '.data/heinsen2019/' in code:
        if PUBLISHED_2019 is None:
            pytest.skip('the published 2019 weights are not present')
        (tmp_path / '.data').mkdir()
        (tmp_path / '.data' / 'heinsen2019').symlink_to(PUBLISHED_2019)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f'{page} example {k}', 'exec'), {'__name__': f'docs_example_{k}'})
