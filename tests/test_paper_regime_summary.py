"""benchmarks.sst_paper_regime: which seeds count (both runs finished), the per-seed records kept across sittings,
the learning-curve figure."""
import json
import os

from benchmarks import sst_paper_regime


def write_run(folder, n_epochs, finished, valid=0.5, test=0.5):
    os.makedirs(folder, exist_ok=True)
    records = [{'epoch': k, 'train_loss': 1.0 / k, 'train_acc': 0.4 + 0.01 * k, 'epoch_seconds': 60.0,
                'valid_acc': 0.4 + 0.005 * k} for k in range(1, n_epochs + 1)]
    if finished:
        records.append({'final': {'valid_accuracy': valid, 'test_accuracy': test}})
    with open(os.path.join(folder, 'metrics.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)


def test_collect_counts_seeds_whose_two_runs_finished_and_keeps_earlier_records(tmp_path):
    runs, records = tmp_path / 'runs', str(tmp_path / 'docs' / 'records')
    write_run(runs / 'seed0' / 'sst5', 10, True, valid=0.46)
    write_run(runs / 'seed0' / 'sst2', 3, True, valid=0.83)
    write_run(runs / 'seed1' / 'sst5', 10, True)
    write_run(runs / 'seed1' / 'sst2', 2, False)                  # still training: not counted, not copied
    write_run(runs / 'seed2' / 'sst5', 4, False)
    seeds = sst_paper_regime.collect(str(runs), records)
    assert list(seeds) == [0]
    epochs, final = seeds[0]['sst5']
    assert len(epochs) == 10 and final['valid_accuracy'] == 0.46
    assert sorted(os.listdir(records)) == ['seed0_sst2.jsonl', 'seed0_sst5.jsonl', 'seed1_sst5.jsonl']

    # a later sitting: seed 0's runs are gone (another machine), seed 1 has finished; seed 0 stays recorded
    later = tmp_path / 'later'
    write_run(later / 'seed1' / 'sst5', 10, True)
    write_run(later / 'seed1' / 'sst2', 3, True, valid=0.84)
    seeds = sst_paper_regime.collect(str(later), records)
    assert list(seeds) == [0, 1] and seeds[1]['sst2'][1]['valid_accuracy'] == 0.84

    png = tmp_path / 'curves.png'
    sst_paper_regime.plot_curves(seeds, str(png))
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 10_000


def test_a_run_replaces_the_committed_head_only_if_better_at_the_stated_precision():
    from benchmarks.common import better_on_dev, stated
    committed = stated(0.49682107175295187)                       # the config states 0.4968
    assert not better_on_dev(0.49682107175295187, committed)      # the committed head's own run is not better
    assert not better_on_dev(0.4968, committed)
    assert better_on_dev(0.49691, committed)
    assert not better_on_dev(0.4901, committed)


def test_reports_show_folders_outside_the_repository_as_placeholders(tmp_path):
    """A report's command and paths name a folder outside the repository by its placeholder ($DATA_ROOT, ...), not by
    the measuring machine's path; folders inside the repository stay as relative paths."""
    from benchmarks.common import REPO_ROOT, shown_command, shown_path
    argv = ['--data_root', str(tmp_path / 'data'), '--runs', str(tmp_path / 'runs'), '--n_sentences', '250',
            f'--feature_cache={tmp_path}/features', '--report', os.path.join(REPO_ROOT, 'docs', 'x.md')]
    assert shown_command('benchmarks.faithfulness', argv) == (
        'python -m benchmarks.faithfulness --data_root $DATA_ROOT --runs $OUT/frozen-heads --n_sentences 250 '
        '--feature_cache=$FEATURE_CACHE --report docs/x.md')
    assert shown_path(os.path.join(REPO_ROOT, 'runs', 'a'), '$OUT') == os.path.join('runs', 'a')
    assert shown_path(REPO_ROOT + 'x', '$OUT') == '$OUT'                    # a sibling whose name starts the same


def test_offline_profile_accuracies_read_only_the_runs(tmp_path):
    """benchmarks.resources reads each run's final accuracies; the profile's recorded precision beside the runs is
    not a run."""
    from benchmarks.resources import offline_accuracies
    seed = tmp_path / 'offline' / 'seed0'
    write_run(str(seed / 'sst5'), 1, finished=True, valid=0.45, test=0.43)
    write_run(str(seed / 'sst2'), 1, finished=False)
    (seed / 'precision.txt').write_text('float32\n')
    assert offline_accuracies(str(tmp_path)) == {'sst5': (0.45, 0.43), 'sst2': (None, None)}
