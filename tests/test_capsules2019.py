"""The 2019 paper's capsule networks (models.SmallNORBClassifier, models.SSTClassifier) and their
training by `train.py --model capsules2019`: shapes, gradients, padding, the 2019 state-dict key
names, the regime's schedule, and training steps on tiny inputs (smallNORB-format files, a tiny BERT)."""
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from heinsen_replication import checkpoints, data, models
from tests.helpers.files import metrics_records as metrics, write_smallnorb


def run(argv):
    return train.main([str(a) for a in argv])


# -------------------------------------------------------------------------------------------------
# SmallNORBClassifier
# -------------------------------------------------------------------------------------------------

def test_smallnorb_classifier_shapes_grid_and_gradients():
    torch.manual_seed(0)
    net = models.SmallNORBClassifier(n_objs=5, n_parts=8, d_chns=16)
    seen = {}
    net.convolve[0].register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    net.routings[0].register_forward_hook(lambda m, args, out: seen.update(a=args[0], mu=args[1]))
    images = torch.rand(2, 2, 96, 96)
    a, mu, sig2 = net(images)
    assert a.shape == (2, 5) and mu.shape == (2, 5, 4, 4) and sig2.shape == (2, 5, 4, 4)
    assert torch.isfinite(a).all() and (sig2 > 0).all()
    # input: the stereo pair, then a channel varying down the rows and one across the columns, each -1..1
    x = seen['x']
    assert x.shape == (2, 4, 96, 96) and torch.equal(x[:, :2], images)
    assert torch.allclose(x[0, 2, :, 7], torch.linspace(-1, 1, 96)) and torch.equal(x[0, 2, 5], x[0, 2, 5, :1].expand(96))
    assert torch.allclose(x[0, 3, 7, :], torch.linspace(-1, 1, 96)) and torch.equal(x[0, 3, :, 5], x[0, 3, :1, 5].expand(96))
    # six conv blocks, strides 1, 2, 1, 2, 1, 2, no padding: 96 x 96 -> 9 x 9 positions of n_parts capsules
    assert [m.stride[0] for m in net.convolve if isinstance(m, torch.nn.Conv2d)] == [1, 2, 1, 2, 1, 2]
    assert seen['a'].shape == (2, 9 * 9 * 8) and seen['mu'].shape == (2, 9 * 9 * 8, 4, 4)
    # capsule order: part-major, index p * h * w + r * w + c; channel p * 16 + e = element e (row-major) of the pose
    z = net.convolve(x)
    assert torch.allclose(seen['a'][0, 3 * 81 + 1 * 9 + 2], net.compute_a(z)[0, 3, 1, 2])
    assert torch.allclose(seen['mu'][0, 3 * 81 + 1 * 9 + 2].flatten(), net.compute_mu(z)[0, 3 * 16:4 * 16, 1, 2])
    assert torch.allclose(seen['mu'][0, 3 * 81 + 1 * 9 + 2][1, 2], net.compute_mu(z)[0, 3 * 16 + 6, 1, 2])
    # every parameter gets a gradient, from the scores and from the poses
    (a.sum() + mu.square().sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.routings[1].beta_use.grad.abs().sum() > 0 and net.convolve[1].weight.grad.abs().sum() > 0


def test_smallnorb_classifier_bad_input():
    net = models.SmallNORBClassifier(n_parts=4, d_chns=8)
    for bad in (torch.rand(2, 3, 96, 96), torch.rand(2, 96, 96), torch.rand(2, 2, 16, 16)):
        with pytest.raises(ValueError, match=r'images must be a stereo batch \[batch, 2, H, W\]'):
            net(bad)
    with pytest.raises(ValueError, match='floating point'):
        net(torch.zeros(2, 2, 96, 96, dtype=torch.uint8))


# -------------------------------------------------------------------------------------------------
# SSTClassifier
# -------------------------------------------------------------------------------------------------

def test_sst_classifier_shapes_gradients_and_padding():
    torch.manual_seed(0)
    net = models.SSTClassifier(d_depth=3, d_emb=16, d_inp=8, d_cap=2, n_parts=6, n_classes=5)
    hidden = torch.randn(2, 7, 3, 16)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 4:] = True                                                 # sample 1 has 4 tokens
    with torch.no_grad():                    # betas start at 0 (a_out = 0 whatever the inputs): as after training
        for routing in net.routings:
            routing.beta_use.normal_(), routing.beta_ign.normal_()
    a, mu, sig2 = net(hidden, mask)
    assert a.shape == (2, 5) and mu.shape == (2, 5, 1, 2) and sig2.shape == (2, 5, 1, 2)
    a.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.depth_emb.grad.abs().sum() > 0 and net.detect_parts[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        # padding takes no part: garbage there changes nothing, and equals the unpadded sample alone
        garbage = hidden.clone()
        garbage[1, 4:] = 1e3
        for out, ref in zip(net(garbage, mask), net(hidden[1:, :4], None)):
            assert torch.allclose(out[1], ref[0], atol=1e-5)
        # no mask = every position is a token
        for out, ref in zip(net(hidden, None), net(hidden, torch.zeros_like(mask))):
            assert torch.equal(out, ref)
        # the input capsules' scores: logit of the (token) mask, every depth of a position alike
        record = {}
        net.routings[0].register_forward_hook(lambda m, args, out: record.update(a=args[0], mu=args[1]))
        net(hidden, mask)
        assert record['a'].shape == (2, 7 * 3) and record['mu'].shape == (2, 7 * 3, 1, 8)
        assert (record['a'][1, :12] == float('inf')).all() and (record['a'][1, 12:] == float('-inf')).all()


def test_sst_classifier_bad_input():
    net = models.SSTClassifier(d_depth=3, d_emb=16, d_inp=8, n_parts=4, n_classes=2)
    with pytest.raises(ValueError, match=r'hidden must have shape \[\.\.\., n_pos, d_depth=3, d_emb=16\]'):
        net(torch.randn(2, 7, 4, 16))
    with pytest.raises(ValueError, match='mask must be a bool tensor'):
        net(torch.randn(2, 7, 3, 16), torch.zeros(2, 7))


# -------------------------------------------------------------------------------------------------
# train.py --model capsules2019
# -------------------------------------------------------------------------------------------------

def test_the_2019_regime_schedule():
    """RAdam lr 5e-4, one cycle: 10% warm-up from 5e-4 / 25, cosine down to 1e-5, beta1 0.95 -> 0.85 -> 0.95."""
    optimizer = torch.optim.RAdam([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    scheduler = train.one_cycle(optimizer, 5e-4, train.REGIMES['capsules2019'], total_steps=100)
    lrs, beta1s = [], []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]['lr'])
        beta1s.append(optimizer.param_groups[0]['betas'][0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(2e-5) and max(lrs) == pytest.approx(5e-4) and lrs.index(max(lrs)) in (9, 10)
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-3)
    assert beta1s[0] == pytest.approx(0.95) and min(beta1s) == pytest.approx(0.85) and beta1s[-1] == pytest.approx(0.95, abs=1e-3)
    args = train.parse_args(['--dataset_name', 'sst5', '--model', 'capsules2019'])
    resolved, regime = train.resolve_args(args)
    assert regime is train.REGIMES['capsules2019'] and (args.lr, args.batch_sz) == (None, None)   # args: as given
    assert (resolved.lr, resolved.batch_sz) == (5e-4, 20) and train.REGIMES['capsules2019']['mixup_alpha'] == {'text': 0.2, 'stereo': 0.2}


def write_small_smallnorb(root, n_train=40, n_test=10, side=32):
    """smallNORB-format files with small images whose category sets their brightness (learnable)."""
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('test', n_test)):
        labels = np.arange(n) % 5
        dat = rng.integers(0, 40, (n, 2, side, side)).astype(np.uint8) + (40 * labels)[:, None, None, None].astype(np.uint8)
        info = np.stack([np.arange(n) % 3, np.zeros(n), 2 * (np.arange(n) % 18), np.zeros(n)], axis=1).astype(np.int32)
        prefix = os.path.join(root, 'smallnorb', data.SMALLNORB_PREFIX[split])
        data.write_smallnorb_file(f'{prefix}dat.mat', dat)
        data.write_smallnorb_file(f'{prefix}cat.mat', labels)
        data.write_smallnorb_file(f'{prefix}info.mat', info)


@pytest.mark.slow
def test_smallnorb_trains_end_to_end_and_loss_falls(tmp_path, capsys):
    write_small_smallnorb(tmp_path)
    out = tmp_path / 'run'
    common = ['--model', 'capsules2019', '--dataset_name', 'smallnorb', '--data_root', tmp_path, '--device', 'cpu',
              '--batch_sz', 10, '--mixup_alpha', 0, '--lr', 1e-2, '--output_dir', out]
    acc = run([*common, '--n_epochs', 20, '--run_test'])
    losses, accs = zip(*[(r['train_loss'], r['train_acc']) for r in metrics(out)[:-1]])
    print('smallnorb smoke training, loss per epoch:', [round(x, 3) for x in losses])
    # the class scores start at 0 (betas are zero-initialised) and grow slowly, so the loss falls slowly;
    # the accuracy tells that it learns: chance (0.2) at first, then most of the training and test images
    assert len(losses) == 20 and max(losses[-3:]) < losses[0] - 0.05, losses
    assert accs[0] <= 0.3 and min(accs[-3:]) >= 0.7 and acc >= 0.8, (accs, acc)
    net, config = checkpoints.from_pretrained(out / 'model')                       # the whole network is saved
    assert type(net) is models.SmallNORBClassifier and (config['n_objs'], config['n_parts'], config['d_chns']) == (5, 64, 64)
    assert config['training']['model'] == 'capsules2019' and config['backbone'] is None
    capsys.readouterr()
    assert run([*common, '--eval_only', '--pretrained_path', out / 'model']) == acc
    assert capsys.readouterr().out.strip().splitlines()[-1] == f'test accuracy: {acc:.4f}'
    # the 2022 head has no backbone to sit on here: a clear error
    with pytest.raises(ValueError, match='pass --model capsules2019'):
        run(['--dataset_name', 'smallnorb', '--data_root', tmp_path, '--device', 'cpu', '--output_dir', tmp_path / 'r2'])


def test_smallnorb_one_step_at_full_size(tmp_path):
    """The real 96 x 96 smallNORB format (tests/test_data.py's fixtures), one optimizer step."""
    write_smallnorb(tmp_path / 'smallnorb', n=4)
    out = tmp_path / 'run'
    argv = ['--model', 'capsules2019', '--dataset_name', 'smallnorb', '--data_root', tmp_path, '--device', 'cpu',
            '--batch_sz', 2, '--n_iters_per_train_epoch', 1, '--output_dir', out]
    run([*argv, '--n_epochs', 1])
    assert load_file(out / 'model' / 'model.safetensors')['routings.1.beta_use'].abs().sum() > 0   # initialised to 0: it trained
    with pytest.raises(ValueError, match=r'trained with --n_epochs 1 \(now 2\): resume with the same arguments'):
        run([*argv, '--n_epochs', 2, '--resume'])


def test_sst_classifier_trains_through_train_py(tiny_sst, tiny_bert, tmp_path, capsys):
    out = tmp_path / 'run'
    common = ['--model', 'capsules2019', '--dataset_name', 'sst5', '--backbone', tiny_bert, '--data_root', tiny_sst,
              '--device', 'cpu', '--feature_cache', tmp_path / 'cache']
    acc = run([*common, '--n_epochs', 1, '--n_iters_per_train_epoch', 1, '--run_test', '--output_dir', out])
    net, config = checkpoints.from_pretrained(out / 'model')
    after = net.state_dict()
    assert type(net) is models.SSTClassifier and (config['d_inp'], config['d_cap'], config['n_parts']) == (64, 2, 64)
    assert config['training']['model'] == 'capsules2019'
    assert after['routings.1.beta_use'].abs().sum() > 0                        # initialised to 0: it trained
    capsys.readouterr()
    assert run([*common, '--eval_only', '--pretrained_path', out / 'model', '--output_dir', out]) == acc
    # without --model, the model is the pretrained one's; a capsule model is not a routing head: a clear error
    without_model = ['--dataset_name', 'sst5', '--backbone', tiny_bert, '--data_root', tiny_sst, '--device', 'cpu',
                     '--eval_only', '--pretrained_path', out / 'model', '--output_dir', out]
    assert run(without_model) == acc
    with pytest.raises(ValueError, match="trained with model 'capsules2019', not --model 'routing_head'"):
        run([*without_model, '--model', 'routing_head'])
    # fine-tuning from it trains only the last routing
    tuned = tmp_path / 'tuned'
    run([*common, '--n_epochs', 1, '--n_iters_per_train_epoch', 2, '--output_dir', tuned,
         '--pretrained_path', out / 'model'])
    tuned_state = load_file(tuned / 'model' / 'model.safetensors')
    assert torch.equal(tuned_state['routings.0.W'], after['routings.0.W']) and torch.equal(tuned_state['depth_emb'], after['depth_emb'])
    assert not torch.equal(tuned_state['routings.1.beta_use'], after['routings.1.beta_use'])
