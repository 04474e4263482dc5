"""
The reports and the documentation against the committed records and the repository: every generated page and block
is what `python -m benchmarks.reports` makes from the records (nothing measured), every repository path the README and
the docs name exists, and no committed text outside tests/ speaks of how it was made (issue numbers, sessions, lent
machines, "the spec"), which means nothing to a reader of the repository.
"""
import os
import re
import subprocess

import pytest

from benchmarks import reports
from benchmarks.common import REPO_ROOT, how_measured

PAGES_WITH_PATHS = ['README.md', *sorted(f'docs/{f}' for f in os.listdir(os.path.join(REPO_ROOT, 'docs'))
                                                        if f.endswith('.md')),
                    *sorted(f'benchmarks/{f}' for f in os.listdir(os.path.join(REPO_ROOT, 'benchmarks'))
                            if f.endswith('.md')),
                    *sorted(f'pretrained/{d}/README.md' for d in os.listdir(os.path.join(REPO_ROOT, 'pretrained'))
                            if os.path.exists(os.path.join(REPO_ROOT, 'pretrained', d, 'README.md')))]
TOP_LEVEL = ('docs/', 'benchmarks/', 'pretrained/', 'heinsen_routing/', 'heinsen_replication/', 'studies/',
             'notebooks/', 'tests/', '.ci/')
FILE_NAME = re.compile(r'^[\w.-]+\.(py|md|sh|toml|cff|ipynb)$')      # a bare file name: some tracked file's
# Paths the docs name on purpose though they are not in the repository: what runs write (git-ignored), what a user
# downloads, and files of the hub or of the authors' repositories.
NOT_IN_THE_REPOSITORY = {'notebooks/outputs', 'pretrained/imagenet1k_beit_large_routing_head', 'sst.py'}


def tracked_names():
    files = subprocess.run(['git', 'ls-files'], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    return {os.path.basename(f) for f in files.split()}


def test_every_generated_page_and_block_is_what_its_records_give():
    differ = [page for page, text in reports.generated().items()
              if open(os.path.join(REPO_ROOT, page)).read() != text]
    assert not differ, f"{differ} differ from their records: run python -m benchmarks.reports"


def test_generation_reads_records_only(monkeypatch):
    """Pure: no benchmark, training or model loading runs while the pages are generated."""
    import train

    def refuse(*args, **kwargs):
        raise AssertionError('a report page ran a measurement')
    monkeypatch.setattr(train, 'main', refuse)
    monkeypatch.setattr(subprocess, 'run', refuse)
    assert reports.generated()


def test_record_appends_a_benchmarks_output_to_its_log(tmp_path, monkeypatch):
    """`python -m benchmarks.reports record PAGE --command ...` (its documented use) adds a section with the piped
    output and its meta to the log's record and rewrites the page; --command is the shown command, not the action."""
    import io
    import shutil
    os.makedirs(tmp_path / 'benchmarks' / 'records')
    shutil.copy(os.path.join(REPO_ROOT, 'benchmarks', 'records', 'routing_ops.json'), tmp_path / 'benchmarks' / 'records')
    monkeypatch.setattr(reports, 'REPO_ROOT', str(tmp_path))
    monkeypatch.setattr('sys.stdin', io.StringIO('| a | b |\n|---|---|\n| 1 | 2 |\n'))
    reports.main(['record', 'benchmarks/routing_ops.md', '--heading', 'Counts again', '--command',
                  'python -m benchmarks.routing_ops', '--precision', 'float32', '--threads', '1'])
    last = reports.load_record(str(tmp_path / 'benchmarks' / 'records' / 'routing_ops.json'))['sections'][-1]
    assert last['heading'] == 'Counts again' and last['output'].startswith('| a | b |')
    assert last['meta']['command'] == 'python -m benchmarks.routing_ops' and last['meta']['threads'] == 1
    page = (tmp_path / 'benchmarks' / 'routing_ops.md').read_text()
    assert '## Counts again' in page and '| 1 | 2 |' in page


def test_every_record_says_how_it_was_measured():
    for page, (record, _) in reports.PAGES.items():
        assert os.path.exists(os.path.join(REPO_ROOT, record)), f"{page}: no record {record}"
    for meta in ['docs/frozen_heads/meta.json', 'docs/sst_results/record.json', 'docs/resources/record.json']:
        text = how_measured(reports.load_record(os.path.join(REPO_ROOT, meta)).get('meta', {'command': None})) \
            if not meta.endswith('resources/record.json') else \
            how_measured(reports.load_record(os.path.join(REPO_ROOT, meta))['offline'][0]['meta'])
        assert 'How it was measured' in text and 'CPU' in text and 'precision' in text


def test_a_busy_measurement_says_so_and_is_not_the_headline():
    from benchmarks.resources import headline
    record = reports.load_record(os.path.join(REPO_ROOT, 'docs/resources/record.json'))
    best = headline(record)
    assert best is not None and not reports.busy(best['meta'])
    assert any(reports.busy(r['meta']) for r in record['offline'])
    assert 'not headline figures' in how_measured({'cpu_count': 2, 'load_start': 19.4, 'load_end': 11.0})
    assert 'not headline figures' not in how_measured({'cpu_count': 2, 'load_start': 1.0, 'load_end': 1.4})


def test_blocks_are_replaced_between_their_markers_only(tmp_path, monkeypatch):
    page = tmp_path / 'page.md'
    page.write_text('before\n' + reports.BEGIN.format('x') + '\nold\n' + reports.END.format('x') + '\nafter\n')
    monkeypatch.setattr(reports, 'PAGES', {})
    monkeypatch.setattr(reports, 'BLOCKS', {(str(page), 'x'): lambda: 'new'})
    assert reports.generated()[str(page)] == ('before\n' + reports.BEGIN.format('x') + '\nnew\n'
                                              + reports.END.format('x') + '\nafter\n')


def named_paths(page):
    """The repository paths a markdown page names: its relative links, and code spans that look like paths."""
    text = open(os.path.join(REPO_ROOT, page)).read()
    here = os.path.dirname(page)
    found = []
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
        if re.match(r'^(https?:|mailto:|#)', target):
            continue
        found.append(os.path.normpath(os.path.join(here, target.split('#')[0])))
    for span in re.findall(r'`([^`\n]+)`', text):
        span = span.split('::')[0]
        if re.search(r'[\s<>$*{}\[\]=,(]', span) or span.startswith(('OUT/', 'runs/', '.data/')):
            continue
        if span.startswith(TOP_LEVEL):
            found.append(os.path.normpath(span))
        elif FILE_NAME.match(span) and span not in tracked_names():
            found.append(span)
    return [p for p in found if p not in NOT_IN_THE_REPOSITORY]


@pytest.mark.parametrize('page', PAGES_WITH_PATHS)
def test_every_path_a_page_names_exists(page):
    missing = [p for p in named_paths(page) if not os.path.exists(os.path.join(REPO_ROOT, p))]
    assert not missing, f"{page} names paths that do not exist: {missing}"


# What committed text must not speak of: how it was made. "the spec" as a phrase (not "the special").
PROCESS_WORDS = re.compile(r'issue [0-9]|\bsessions?\b|\blent\b|virtual machine|\bthe spec\b', re.IGNORECASE)


def test_no_committed_text_outside_tests_speaks_of_issues_or_sessions():
    files = subprocess.run(['git', 'ls-files'], cwd=REPO_ROOT, capture_output=True, text=True,
                           check=True).stdout.split('\n')
    hits = []
    for name in files:
        if not name or name.startswith('tests/') or not os.path.isfile(os.path.join(REPO_ROOT, name)):
            continue
        try:
            text = open(os.path.join(REPO_ROOT, name), encoding='utf-8').read()
        except UnicodeDecodeError:
            continue                                                            # binary
        hits += [f"{name}:{n + 1}: {line.strip()[:100]}" for n, line in enumerate(text.splitlines())
                 if PROCESS_WORDS.search(line)]
    assert not hits, '\n'.join(hits)


def test_a_saved_head_records_the_command_that_reproduces_it_and_a_card_that_links_to_nothing_false(tmp_path):
    import train
    from tests.test_capsules2019 import write_small_smallnorb
    write_small_smallnorb(tmp_path, n_train=20, n_test=10)
    out = tmp_path / 'run'
    argv = ['--model', 'capsules2019', '--dataset_name', 'smallnorb', '--data_root', str(tmp_path), '--device', 'cpu',
            '--batch_sz', '10', '--n_epochs', '1', '--output_dir', str(out), '--run_test']
    train.main([*argv, '--overwrite'])
    config = reports.load_record(out / 'model' / 'config.json')
    assert config['training']['reproduce'] == 'python train.py ' + ' '.join(argv)      # --overwrite dropped
    card = (out / 'model' / 'README.md').read_text()
    assert 'python train.py' in card and '@misc{heinsen2022algorithm' in card and 'license: mit' in card
    assert not re.search(r'pushed to the Hub|More Information Needed|github\.com/glassroom', card)


def test_the_package_version_is_the_newest_changelog_entry():
    import tomllib

    import heinsen_routing
    with open(os.path.join(REPO_ROOT, 'pyproject.toml'), 'rb') as f:
        version = tomllib.load(f)['project']['version']
    newest = re.search(r'^## (\d+\.\d+\.\d+) \(\d{4}-\d\d-\d\d\)', open(os.path.join(REPO_ROOT, 'CHANGELOG.md')).read(),
                       re.M)
    assert newest and newest.group(1) == version == heinsen_routing.__version__
    assert 'Unreleased' not in open(os.path.join(REPO_ROOT, 'CHANGELOG.md')).read()
