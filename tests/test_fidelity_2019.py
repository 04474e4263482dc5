"""The 2019 library's `Routing` API and the authors' published 2019 models: the 2019 README's snippets run as
written, `Routing` is GenerativeMatrixRouting (one EM loop), and the three published state dicts load strict
into models.SmallNORBClassifier / models.SSTClassifier and reproduce the reference outputs of
../shared/spec/models2019.md to 1e-4."""
import math
import os

import pytest
import torch

from heinsen_replication import backbones, models
from heinsen_replication.errors import UsageError
from heinsen_routing import GenerativeMatrixRouting, Routing
from tests.helpers.files import PUBLISHED_2019

needs_weights = pytest.mark.skipif(PUBLISHED_2019 is None, reason='the published 2019 weights are not present')


def pattern(*shape):
    """The spec's deterministic test input."""
    return (torch.arange(math.prod(shape), dtype=torch.float64) * 0.6180339887).remainder(1.0).reshape(shape).float()


def published(name):
    path = os.path.join(PUBLISHED_2019, f'{name}_pretrained_model_state_dict.pt')
    return torch.load(path, map_location='cpu', weights_only=True)


# -------------------------------------------------------------------------------------------------
# Routing: the 2019 API
# -------------------------------------------------------------------------------------------------

def test_the_2019_readme_snippets_run_as_written():
    n = 7
    detect_objs = Routing(d_cov=4, d_inp=4, d_out=4, n_inp=100, n_out=10)
    obj_scores, obj_poses, obj_poses_sig2 = detect_objs(torch.randn(100), torch.randn(100, 4, 4))
    assert obj_scores.shape == (10,) and obj_poses.shape == obj_poses_sig2.shape == (10, 4, 4)

    classify = Routing(d_cov=1, d_inp=1024, d_out=8, n_out=2)            # variable n_inp
    class_scores, class_embs, class_embs_sig2 = classify(torch.randn(n), torch.randn(n, 1024).unsqueeze(1))
    assert class_scores.shape == (2,) and class_embs.shape == class_embs_sig2.shape == (2, 1, 8)

    predict = Routing(d_cov=1, d_inp=256, d_out=64, n_inp=10)           # variable n_out
    pred_scores, pred_caps, pred_caps_sig2 = predict(torch.randn(10), torch.randn(10, 1, 256), n_out=n)
    assert pred_scores.shape == (n,) and pred_caps.shape == pred_caps_sig2.shape == (n, 1, 64)

    *outputs, R = predict(torch.randn(10), torch.randn(10, 1, 256), n_out=n, return_R=True)
    assert len(outputs) == 3 and R.shape == (10, n)
    torch.testing.assert_close(R.sum(-1), torch.ones(10))
    assert predict(torch.randn(10), torch.randn(10, 1, 256))[0].shape == (10,)   # n_out not given: n_out = n


def test_state_dict_keys_shapes_and_inits_follow_the_2019_spec():
    fixed = Routing(d_cov=4, d_inp=3, d_out=2, n_inp=6, n_out=5)
    assert {k: tuple(v.shape) for k, v in fixed.state_dict().items()} == {
        'W': (6, 5, 3, 2), 'B': (6, 5, 4, 2), 'beta_use': (6, 5), 'beta_ign': (6, 5), 'CONST_one': ()}
    variable = Routing(d_cov=4, d_inp=3, d_out=2, n_inp=-1, n_out=-1, single_beta=True)
    assert {k: tuple(v.shape) for k, v in variable.state_dict().items()} == {
        'W': (1, 1, 3, 2), 'B': (1, 1, 4, 2), 'B_brk': (1, 4, 2), 'beta_use': (1, 1), 'beta_ign': (1, 1),
        'CONST_one': ()}
    assert variable.beta_ign is variable.beta_use
    torch.manual_seed(0)
    big = Routing(d_cov=1, d_inp=64, d_out=64, n_inp=64, n_out=-1)
    assert big.W.std().item() == pytest.approx(1 / 64, rel=0.02)                  # standard normal / d_inp
    assert all(torch.count_nonzero(t) == 0 for t in (big.B, big.B_brk, big.beta_use, big.beta_ign))
    assert big.CONST_one.item() == 1.0


def test_variable_n_out_reproduces_the_spec_reference():
    routing = Routing(d_cov=1, d_inp=8, d_out=4, n_inp=10)                          # variable n_out
    with torch.no_grad():
        for p in routing.parameters():
            p.copy_(pattern(*p.shape) - 0.5)
    a_out, mu_out, sig2_out, R = routing(pattern(10) * 4 - 2, pattern(10, 1, 8) - 0.5, n_out=5, return_R=True)
    torch.testing.assert_close(a_out, torch.tensor([-0.391474, -0.391468, -0.391463, -0.391458, -0.391453]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(mu_out[:, 0, :2], torch.tensor(
        [[0.734320, -0.222293], [0.484327, -0.163284], [0.234333, -0.104274], [-0.015661, -0.045265],
         [-0.265655, 0.013745]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(R[0], torch.tensor([0.200013, 0.200007, 0.200000, 0.199994, 0.199987]),
                               atol=1e-4, rtol=0)
    assert sig2_out.shape == (5, 1, 4) and (sig2_out > 0).all()


def test_routing_is_generative_matrix_routing():
    """Fixed n_inp and n_out: the same module, the same state dict, the same numbers."""
    torch.manual_seed(0)
    routing = Routing(d_cov=2, d_inp=3, d_out=4, n_inp=6, n_out=5, p_model='skm')
    gmr = GenerativeMatrixRouting(6, 5, 2, 3, 4, p_model='skm')
    assert isinstance(routing, GenerativeMatrixRouting) and type(routing)._route is GenerativeMatrixRouting._route
    with torch.no_grad():
        routing.beta_use.normal_(), routing.beta_ign.normal_(), routing.B.normal_()
    gmr.load_state_dict(routing.state_dict(), strict=True)
    a_inp, mu_inp = torch.randn(3, 6), torch.randn(3, 6, 2, 3)
    for ours, theirs in zip(routing(a_inp, mu_inp), gmr(a_inp, mu_inp)):
        assert torch.equal(ours, theirs)


def test_variable_n_out_batches_masks_and_bias_symmetry_breaking():
    torch.manual_seed(0)
    routing = Routing(d_cov=1, d_inp=4, d_out=3, n_inp=-1, n_out=-1)
    with torch.no_grad():
        for p in routing.parameters():
            p.normal_()
    a_inp, mu_inp = torch.randn(2, 6), torch.randn(2, 6, 1, 4)
    mask = torch.zeros(2, 6, 1, dtype=torch.bool)
    mask[1, 4:] = True                                                              # sample 1 has 4 inputs
    garbage = mu_inp.clone()
    garbage[1, 4:] = float('nan')                                                   # masked: must not matter
    a_nan = a_inp.clone()
    a_nan[1, 4:] = float('inf')
    batched = routing(a_nan, garbage, mask=mask, n_out=3, return_R=True)
    alone = routing(a_inp[1, :4], mu_inp[1, :4], n_out=3, return_R=True)
    for b, s in zip(batched[:3], alone[:3]):
        torch.testing.assert_close(b[1], s, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(batched[3][1, 4:]) == 0                             # masked inputs: R = 0
    # the outputs differ only by B_brk t_j: with B_brk = 0 every output is the same
    with torch.no_grad():
        routing.B_brk.zero_()
    a_out, mu_out, _ = routing(a_inp, mu_inp, n_out=4)
    torch.testing.assert_close(mu_out, mu_out[:, :1].expand_as(mu_out))


def test_routing_bad_input_gives_clear_errors():
    fixed = Routing(d_cov=1, d_inp=4, d_out=2, n_out=3)
    with pytest.raises(ValueError, match=r'n_out=5 given to forward, but this module was built with n_out=3'):
        fixed(torch.randn(6), torch.randn(6, 1, 4), n_out=5)
    variable = Routing(d_cov=1, d_inp=4, d_out=2, n_inp=6)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match='n_out must be a positive int'):
            variable(torch.randn(6), torch.randn(6, 1, 4), n_out=bad)
    with pytest.raises(ValueError, match='a_inp has dtype torch.float64 but mu_inp has torch.float32'):
        variable(torch.randn(6, dtype=torch.float64), torch.randn(6, 1, 4))
    with pytest.raises(ValueError, match=r'mu_inp must have shape \[\.\.\., 6, d_cov, d_inp\]'):
        variable(torch.randn(5), torch.randn(5, 1, 4))
    with pytest.raises(ValueError, match=r'mask must be broadcastable to \[\.\.\., n, n_out\] = \[6, 7\]'):
        variable(torch.randn(6), torch.randn(6, 1, 4), n_out=7, mask=torch.zeros(6, 3, dtype=torch.bool))
    for bad in (0, -1e-5, True, float('inf')):
        with pytest.raises(ValueError, match='eps must be a positive float'):
            Routing(d_cov=1, d_inp=4, d_out=2, eps=bad)
    for name, bad in (('d_cov', 0), ('d_inp', -1), ('d_out', 2.0), ('d_inp', True)):
        with pytest.raises(ValueError, match=f'{name} must be a positive int'):
            Routing(**{'d_cov': 1, 'd_inp': 4, 'd_out': 2, name: bad})
    with torch.autocast('cpu', dtype=torch.bfloat16):                               # autocast leaves float64 alone
        with pytest.raises(ValueError, match=r'mu_inp has dtype torch.float64 inside torch.autocast'):
            variable(torch.randn(6, dtype=torch.float64), torch.randn(6, 1, 4, dtype=torch.float64))


def test_record_credit_sees_routing():
    from heinsen_routing import record_credit
    model = torch.nn.ModuleList([Routing(d_cov=1, d_inp=4, d_out=2, n_out=3)])
    a_inp, mu_inp = torch.randn(2, 5), torch.randn(2, 5, 1, 4)
    with record_credit(model) as phis:
        a_out = model[0](a_inp, mu_inp)[0]
    torch.testing.assert_close(phis[0].sum(-2), a_out)                              # a_out = sum_i phi


# -------------------------------------------------------------------------------------------------
# The published models
# -------------------------------------------------------------------------------------------------

@needs_weights
def test_published_smallnorb_model_loads_strict_and_reproduces_reference():
    net = models.SmallNORBClassifier(n_objs=5, n_parts=64, d_chns=64)
    state = published('smallNORB')
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        a_out, mu_out, sig2_out = net.eval()(pattern(2, 2, 96, 96))
    torch.testing.assert_close(a_out, torch.tensor([[-3.014154, -4.640965, -3.497234, -0.719764, 2.957782],
                                                    [-2.995926, -4.893620, -3.406914, -1.011621, 2.938534]]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(mu_out[0, 0], torch.tensor(
        [[0.134316, -0.044610, -0.060722, -0.028848], [0.006954, 0.012249, -0.012786, 0.097536],
         [-0.041646, -0.062325, -0.062444, 0.050268], [0.054125, 0.053467, 0.083167, -0.018491]]), atol=1e-4, rtol=0)
    assert (sig2_out > 0).all()


SST_REFERENCE = {
    'SST2R': [[-0.877507, 0.977107], [-0.419086, 0.518716]],
    'SST5R': [[-0.706404, -0.341331, 1.899994, 0.932637, -1.859833],
              [-0.418252, -0.127413, 1.821547, 0.733983, -1.749974]],
}


@needs_weights
@pytest.mark.parametrize('name', SST_REFERENCE)
def test_published_sst_models_load_strict_and_reproduce_reference(name):
    reference = torch.tensor(SST_REFERENCE[name])
    net = models.SSTClassifier(d_depth=37, d_emb=1280, d_inp=64, d_cap=2, n_parts=64, n_classes=len(reference[0]))
    net.load_state_dict(published(name), strict=True)
    hidden = (pattern(2, 9, 37, 1280) - 0.5) * 4
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 5:] = True                                                              # sample 1: 5 tokens
    with torch.no_grad():
        a_out, _, _ = net.eval()(hidden, mask)
        torch.testing.assert_close(a_out, reference, atol=1e-4, rtol=0)
        # sample 1 alone, unpadded, gives the same scores: padding takes no part
        torch.testing.assert_close(net(hidden[1:, :5])[0][0], reference[1], atol=1e-4, rtol=0)


# -------------------------------------------------------------------------------------------------
# The 2019 paper's backbone (gpt2-large: no pad token) and the published files through train.py
# -------------------------------------------------------------------------------------------------

def test_gpt2_backbone_pads_with_end_of_text_and_masks_it(tiny_gpt2):
    backbone = backbones.load_backbone(tiny_gpt2)
    assert (backbone.d_depth, backbone.d_emb) == (3, 32) and backbone.tokenizer.pad_token == '<|endoftext|>'
    assert backbones.BACKBONES['gpt2-large'] == ('openai-community/gpt2-large', 'text')
    texts = ['the film is good and lovely and fine', 'the film is bad']
    hidden, mask = backbone.encode(texts)
    n_short = int((~mask[1]).sum())
    assert mask[0].sum() == 0 and mask[1, n_short:].all() and n_short < hidden.shape[1]
    alone, _ = backbone.encode(texts[1:])                       # causal, padded on the right: the real tokens'
    torch.testing.assert_close(hidden[1, :n_short], alone[0], rtol=1e-4, atol=1e-5)   # states do not change


def test_train_py_evaluates_a_published_style_pt_on_gpt2(tiny_gpt2, tiny_sst, tmp_path, capsys):
    """A plain state-dict .pt (as the authors published, here for the tiny GPT-2's 3 depths x 32) evaluates through
    train.py --eval_only with no --model (told by the keys); the wrong backbone gets a clear error."""
    import train
    net = models.SSTClassifier(d_depth=3, d_emb=32, d_inp=64, d_cap=2, n_parts=64, n_classes=5)
    with torch.no_grad():
        for routing in net.routings:
            routing.beta_use.normal_(), routing.beta_ign.normal_()
    path = tmp_path / 'SST5R_pretrained_model_state_dict.pt'
    torch.save(net.state_dict(), path)
    argv = ['--dataset_name', 'sst5', '--data_root', tiny_sst, '--device', 'cpu', '--eval_only',
            '--pretrained_path', path, '--output_dir', tmp_path / 'eval']
    acc = train.main([str(a) for a in [*argv, '--backbone', tiny_gpt2]])
    assert capsys.readouterr().out.strip().splitlines()[-1] == f'test accuracy: {acc:.4f}'
    with pytest.raises(UsageError, match="trained on hidden states of 3 depths x 32"):
        train.main([str(a) for a in [*argv, '--backbone', 'minilm']])


@needs_weights
def test_train_py_loads_the_published_smallnorb_file(tmp_path):
    """The authors' file itself (saved on CUDA, a legacy pickle) through train.py --eval_only, on smallNORB-format
    files (no real smallNORB here): it loads safely on this CPU and predicts what the published model predicts."""
    import numpy as np
    import train
    from heinsen_replication import data
    net = models.SmallNORBClassifier(n_objs=5, n_parts=64, d_chns=64)
    net.load_state_dict(published('smallNORB'), strict=True)
    images = (pattern(5, 2, 96, 96) * 255).to(torch.uint8)
    with torch.no_grad():
        predicted = net.eval()(images.float() / 255)[0].argmax(-1)
    labels = torch.cat([predicted[:3], (predicted[3:] + 1) % 5])            # 3 of 5 agree with the model
    for split in ('train', 'test'):
        prefix = os.path.join(tmp_path, 'smallnorb', data.SMALLNORB_PREFIX[split])
        data.write_smallnorb_file(f'{prefix}dat.mat', images.numpy())
        data.write_smallnorb_file(f'{prefix}cat.mat', labels.numpy().astype(np.int32))
        data.write_smallnorb_file(f'{prefix}info.mat', np.zeros((5, 4), np.int32))
    acc = train.main(['--dataset_name', 'smallnorb', '--data_root', str(tmp_path), '--device', 'cpu', '--eval_only',
                      '--pretrained_path', os.path.join(PUBLISHED_2019, 'smallNORB_pretrained_model_state_dict.pt'),
                      '--output_dir', str(tmp_path / 'eval')])
    assert acc == pytest.approx(3 / 5)
