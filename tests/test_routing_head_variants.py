"""models.RoutingHead's lighter configurations (n_hid, n_routings, d_hid; benchmarks/routing_head_study.py): the
defaults stay the paper's head (keys, initialisation, outputs); each variant trains with train.py, fine-tunes for
SST-2 keeping its architecture, and round-trips save_pretrained / from_pretrained; bad values are one-line errors."""
import json

import pytest
import torch

import models
import train
from heinsen_routing import EfficientVectorRouting
from benchmarks.common import save_record
from tests.helpers.training import run, short_sst_args

D_DEPTH, D_EMB, N_CLASSES = 3, 16, 5
VARIANTS = [{'n_hid': 8}, {'n_routings': 2}, {'d_hid': 8}, {'n_hid': 4, 'n_routings': 2, 'd_hid': 8}]


def test_default_is_the_papers_head_keys_init_and_outputs():
    """RoutingHead() with no options: the same state-dict keys, and the same initialisation and scores as the
    paper's head built here by hand (W = 1, B = 0, then route.0, route.1, route.2 drawn in this order)."""
    torch.manual_seed(0)
    head = models.RoutingHead(D_DEPTH, D_EMB, N_CLASSES)
    torch.manual_seed(0)
    route = torch.nn.ModuleList([EfficientVectorRouting(n_inp=-1, n_out=64, d_inp=D_EMB, d_out=D_EMB),
                                 EfficientVectorRouting(n_inp=64, n_out=64, d_inp=D_EMB, d_out=D_EMB),
                                 EfficientVectorRouting(n_inp=64, n_out=N_CLASSES, d_inp=D_EMB, d_out=1)])
    expected = {'W': torch.ones(D_DEPTH, D_EMB), 'B': torch.zeros(D_DEPTH, D_EMB),
                **{f'route.{k}': v for k, v in route.state_dict().items()}}
    state = head.state_dict()
    assert list(state) == list(expected)
    for k in state:
        torch.testing.assert_close(state[k], expected[k], rtol=0, atol=0, msg=k)
    hidden, mask = torch.randn(2, 6, D_DEPTH, D_EMB), torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True
    x = torch.nn.functional.layer_norm(hidden, (D_EMB,)).flatten(-3, -2)
    x = route[2](route[1](route[0](x, mask=mask.repeat_interleave(D_DEPTH, -1)[..., None]))).squeeze(-1)
    torch.testing.assert_close(head(hidden, mask), x)
    assert (head.n_routings, head.d_hid) == (3, None)


@pytest.mark.parametrize('options', VARIANTS, ids=lambda o: ','.join(f'{k}={v}' for k, v in o.items()))
def test_variant_shapes_keys_credit_and_round_trip(options, tmp_path):
    torch.manual_seed(0)
    head = models.RoutingHead(D_DEPTH, D_EMB, N_CLASSES, **options).eval()
    n_routings, d_hid = options.get('n_routings', 3), options.get('d_hid')
    assert len(head.route) == n_routings and ('project.weight' in head.state_dict()) == (d_hid is not None)
    d_route = d_hid or D_EMB
    assert head.route[0].d_inp == head.route[-1].d_inp == d_route and head.route[0].n_out == options.get('n_hid', 64)
    hidden, mask = torch.randn(2, 6, D_DEPTH, D_EMB), torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 3:] = True
    scores = head(hidden, mask)
    assert scores.shape == (2, N_CLASSES)
    torch.testing.assert_close(scores[0], head(hidden[0, :3]))                 # padding changes nothing
    credit, credit_scores = head.credit(hidden, mask)
    assert credit.shape == (2, 6, D_DEPTH, N_CLASSES) and (credit[0, 3:] == 0).all()
    torch.testing.assert_close(credit_scores, scores)
    head.save_pretrained(tmp_path / 'head')
    config = json.loads((tmp_path / 'head' / 'config.json').read_text())
    assert (config['n_routings'], config['d_hid']) == (n_routings, d_hid)
    loaded, loaded_config = models.from_pretrained(tmp_path / 'head')
    assert type(loaded) is models.RoutingHead and (loaded.n_routings, loaded.d_hid) == (n_routings, d_hid)
    torch.testing.assert_close(loaded.eval()(hidden, mask), scores)


@pytest.mark.parametrize('kwargs, message', [
    ({'n_routings': 4}, 'n_routings must be 3'), ({'n_routings': True}, 'n_routings must be 3'),
    ({'d_hid': 0}, 'd_hid'), ({'d_hid': 2.5}, 'd_hid')])
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        models.RoutingHead(D_DEPTH, D_EMB, N_CLASSES, **kwargs)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('key, value, message', [
    ('n_routings', 5, 'n_routings must be one of 2, 3, got 5'), ('n_routings', '3', "n_routings must be one of"),
    ('d_hid', 0, 'd_hid must be an integer in 1..'), ('d_hid', 'wide', 'd_hid must be an integer in 1..')])
def test_damaged_config_is_refused_naming_file_and_argument(tmp_path, key, value, message):
    models.RoutingHead(D_DEPTH, D_EMB, N_CLASSES, d_hid=8).save_pretrained(tmp_path / 'head')
    path = tmp_path / 'head' / 'config.json'
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(ValueError, match=message) as e:
        models.from_pretrained(tmp_path / 'head')
    assert str(path) in str(e.value) and '\n' not in str(e.value)


def test_config_without_the_new_keys_loads_as_the_papers_head(tmp_path):
    """Folders written before n_routings / d_hid existed hold neither key: the paper's head."""
    models.RoutingHead(D_DEPTH, D_EMB, N_CLASSES).save_pretrained(tmp_path / 'head')
    path = tmp_path / 'head' / 'config.json'
    config = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in config.items() if k not in ('n_routings', 'd_hid')}))
    head, _ = models.from_pretrained(tmp_path / 'head')
    assert (head.n_routings, head.d_hid, head.n_hid) == (3, None, 64)


def test_train_py_trains_each_variant_and_sst2_keeps_its_architecture(tiny_sst, tiny_bert, tmp_path, capsys):
    options = {'n_hid': 4, 'n_routings': 2, 'd_hid': 8}
    argv = [a for k, v in options.items() for a in (f'--{k}', v)]
    sst5 = tmp_path / 'sst5'
    run(short_sst_args(tiny_sst, tiny_bert, sst5, '--n_epochs', 1, *argv))
    head, config = models.from_pretrained(sst5 / 'model')
    assert {k: config[k] for k in options} == options and len(head.route) == 2
    args = short_sst_args(tiny_sst, tiny_bert, tmp_path / 'sst2', '--n_epochs', 1, '--pretrained_path', sst5 / 'model')
    args[1] = 'sst2'
    run(args)                                     # no options: the pretrained head's architecture, last routing trains
    assert 'only the last routing (route.1)' in capsys.readouterr().out
    tuned, tuned_config = models.from_pretrained(tmp_path / 'sst2' / 'model')
    assert {k: tuned_config[k] for k in options} == options and tuned_config['n_classes'] == 2
    for k, v in head.state_dict().items():
        if not k.startswith('route.1.'):
            torch.testing.assert_close(tuned.state_dict()[k], v, msg=k)
    for single in (['--n_hid', 4], ['--n_routings', 2], ['--d_hid', 8]):          # each option alone trains a step
        out = tmp_path / f'one_{single[0][2:]}'
        run(short_sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, *single))
        assert models.from_pretrained(out / 'model')[1][single[0][2:]] == single[1]


def test_train_py_refuses_bad_or_conflicting_head_options(tiny_sst, tiny_bert, tmp_path, capsys):
    for bad, message in ((['--n_routings', '4'], "--n_routings: invalid choice: 4"),
                         (['--n_hid', '0'], '--n_hid must be a positive integer, got 0'),
                         (['--d_hid', '-1'], '--d_hid must be a positive integer, got -1')):
        with pytest.raises(SystemExit):
            train.parse_args(['--dataset_name', 'sst5', *bad])
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match='--n_hid set the architecture of --model routing_head, not of --model '
                                         'token_depth_attention'):
        run(short_sst_args(tiny_sst, tiny_bert, tmp_path / 'c', '--model', 'token_depth_attention', '--n_hid', 8))
    sst5 = tmp_path / 'sst5'
    run(short_sst_args(tiny_sst, tiny_bert, sst5, '--n_epochs', 1, '--n_hid', 4))
    args = short_sst_args(tiny_sst, tiny_bert, tmp_path / 'sst2', '--n_epochs', 1, '--pretrained_path', sst5 / 'model',
                          '--n_hid', 8)
    args[1] = 'sst2'
    with pytest.raises(ValueError, match='--n_hid 8: --pretrained_path .* is a routing head with n_hid 4'):
        run(args)
    # --resume with another architecture than the checkpoint's: named
    out = tmp_path / 'resume'
    run(short_sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 2, '--d_hid', 8))
    with pytest.raises(ValueError, match=r"--d_hid 8 \(now None\)"):
        run(short_sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 2, '--resume'))


def test_named_configurations_build_save_load_and_resolve_in_train_py(tmp_path):
    """RoutingHead.named and train.py --head_config: the sizes of RoutingHead.CONFIGURATIONS, saved in config.json
    like any head's; an option given beside --head_config must agree with it."""
    from heinsen_replication.errors import UsageError
    configurations = models.RoutingHead.CONFIGURATIONS
    assert configurations["paper"] == train.HEAD_OPTIONS                     # the constructor's defaults
    for name, sizes in configurations.items():
        head = models.RoutingHead.named(name, 3, 8, 5)
        assert {k: getattr(head, k) for k in sizes} == sizes
        head.save_pretrained(tmp_path / name)
        loaded, config = models.from_pretrained(tmp_path / name)
        assert {k: config[k] for k in sizes} == sizes
        hidden = torch.randn(2, 4, 3, 8)
        torch.testing.assert_close(loaded(hidden), head(hidden))
        resolved, _ = train.resolve_args(train.parse_args(['--dataset_name', 'sst5', '--head_config', name]))
        assert {k: getattr(resolved, k) for k in sizes} == sizes
    with pytest.raises(ValueError, match="name must be one of 'paper', 'light', got 'tiny'"):
        models.RoutingHead.named('tiny', 3, 8, 5)
    light = configurations['light']
    other = 2 * light['n_hid']
    with pytest.raises(UsageError, match=f"--n_hid {other}: --head_config light has n_hid {light['n_hid']}; give one "
                                         f"or the other"):
        train.resolve_args(train.parse_args(['--dataset_name', 'sst5', '--head_config', 'light', '--n_hid', str(other)]))
    with pytest.raises(UsageError, match='--head_config set the architecture of --model routing_head, not of --model '
                                         'token_depth_attention'):
        train.resolve_args(train.parse_args(['--dataset_name', 'sst5', '--head_config', 'paper',
                                             '--model', 'token_depth_attention']))


def test_study_runs_what_the_records_lack_and_records_how(tiny_sst, tiny_bert, tmp_path, monkeypatch):
    """benchmarks.routing_head_study --run: each configuration's SST-5 then SST-2 run (short ones here, on the tiny
    backbone), one record each with its command and environment; a second --run trains nothing."""
    from benchmarks import routing_head_study as study

    def short_runs(config, seed, data_root, out, feature_cache):
        where = tmp_path / 'runs' / config / f'seed{seed}'
        sst5 = short_sst_args(tiny_sst, tiny_bert, where / 'sst5', '--n_epochs', 1, '--rng_seed', seed, '--run_test',
                              '--resume', *study.head_argv(study.CONFIGS[config][1]))
        sst2 = short_sst_args(tiny_sst, tiny_bert, where / 'sst2', '--n_epochs', 1, '--rng_seed', seed, '--run_test',
                              '--resume', '--pretrained_path', where / 'sst5' / 'model')
        sst2[1] = 'sst2'
        return {'sst5': [str(a) for a in sst5], 'sst2': [str(a) for a in sst2]}

    monkeypatch.setattr(study, 'study_runs', short_runs)
    records = tmp_path / 'records'
    argv = ['--run', '--configs', 'n_hid16,two_routings', '--seeds', '0', '--records', str(records)]
    study.main(argv)
    found = study.read_records(records)
    assert sorted(found) == ['n_hid16', 'two_routings'] and sorted(found['n_hid16'][0]) == ['sst2', 'sst5']
    r = found['two_routings'][0]['sst2']
    assert r['head'] == {'n_hid': 64, 'n_routings': 2, 'd_hid': None} and 0 <= r['test_accuracy'] <= 1
    meta = r['meta']
    assert meta['command'].startswith('python train.py --dataset_name sst2') and meta['threads'] == 1
    assert {'commit', 'when', 'cpu_model', 'torch', 'precision', 'load_start', 'load_end'} <= set(meta)
    monkeypatch.setattr(train, 'main', lambda argv: pytest.fail('a recorded run was trained again'))
    study.main(argv)
    # the report, from these records and a costs record: nothing is measured
    costs = {c: {'parameters': 1000, 'gflop_per_step': 12.0 if c == 'paper' else 3.0}
             for c in [*study.CONFIGS, study.STANDARD_HEAD]}
    save_record({'heads': costs, 'flop_steps': 10, 'meta': {'command': 'x'}}, str(records / 'costs.json'))
    (tmp_path / 'sst_results').mkdir()
    save_record({'routing_head': {'sst5': '45.3 ± 1.1', 'sst2': '82.4 ± 0.5'}},
                str(tmp_path / 'sst_results' / 'record.json'))
    text = study.render(str(records))
    assert "| `n_hid16`: 16 hidden vectors (n_hid 16) | 1,000 | 3.00 | 0.25 |" in text
    assert '`paper`' in text and 'not run' in text and 'SST-5 45.3 ± 1.1, SST-2 82.4 ± 0.5' in text
    assert '**Not answered yet: no lighter configuration has 3 seeds on record**' in text
    summary = study.summary(str(records))
    assert '16 hidden vectors ' in summary and '(1 seed) / ' in summary and 'Not answered yet' in summary


def test_study_verdict_compares_with_the_papers_head_within_one_std():
    from benchmarks.routing_head_study import CONFIGS, baseline, committed_baseline, verdict
    acc = {c: {'sst5': [], 'sst2': []} for c in CONFIGS}
    committed = committed_baseline()                                          # docs/sst_results.md's row
    assert set(committed) == {'sst5', 'sst2'} and all(0 < m < 1 and 0 < s < 0.1 for m, s in committed.values())
    assert baseline(acc, committed)[0] == committed                           # no runs of the paper's head yet
    acc['paper'] = {'sst5': [0.45, 0.46, 0.47], 'sst2': [0.82, 0.83, 0.84]}          # floors 0.45, 0.82
    base, source = baseline(acc, committed)
    assert "this study's runs" in source and abs(base['sst5'][0] - 0.46) < 1e-9 and abs(base['sst5'][1] - 0.01) < 1e-9
    acc['n_hid16'] = {'sst5': [0.451, 0.451, 0.451], 'sst2': [0.821, 0.821, 0.821]}  # held, light
    acc['n_hid32'] = {'sst5': [0.46, 0.46, 0.46], 'sst2': [0.83, 0.83, 0.83]}        # held, heavy
    acc['two_routings'] = {'sst5': [0.44, 0.44, 0.44], 'sst2': [0.9, 0.9, 0.9]}      # below on SST-5
    flops = {c: 1.0 for c in CONFIGS}
    flops.update({'paper': 9.0, 'n_hid16': 3.0, 'n_hid32': 4.5})
    text = verdict(acc, flops, base)
    assert 'at one third of its FLOPs or less: `n_hid16`.' in text and 'more than a third of its FLOPs: `n_hid32`' in text
    assert 'two_routings' not in text and 'fewer than 3 seeds on record: `d_hid128`, `n_hid8`' in text
    assert "The library's `light` configuration, `n_hid16_d_hid128`, has fewer than 3 seeds on record." in text
    acc['n_hid16_d_hid128'] = acc['n_hid16']
    assert "The lightest, `n_hid16_d_hid128`, is the configuration the library names `light`" in verdict(acc, flops, base)
    acc['n_hid16']['sst2'] = [0.81] * 3
    assert verdict(acc, flops, base).startswith('**No configuration with 3 seeds on record is within one std')
