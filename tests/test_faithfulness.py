"""benchmarks.faithfulness: the attribution methods on a head's inputs (Captum), and the deletion / insertion test."""
import pytest
import torch

from benchmarks import faithfulness
from benchmarks.common import routing_credit
from heinsen_replication import models, standard_heads
from tests.helpers.files import SST_DIR


def padded_batch():
    torch.manual_seed(0)
    hidden = torch.randn(3, 6, 3, 8, dtype=torch.double)                        # [b, n_pos, d_depth, d_emb]
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[1, 4:], mask[2, 2:] = True, True
    return hidden, mask


@pytest.mark.parametrize('cls', [standard_heads.ScalarMixMeanHead, standard_heads.ScalarMixAttentionHead])
def test_integrated_gradients_are_complete_and_zero_at_padding(cls):
    """IG's token attributions sum to p(x) - p(0) for the predicted class (completeness), sample by sample, and give
    padding nothing: the mask and the target reach Captum's scaled copies; the gaps are recorded. (Not so for the
    RoutingHead: from all-zero states its output changes too abruptly for 1000 steps, which the report states.)"""
    hidden, mask = padded_batch()
    head = cls(3, 8, 4).double().eval()
    with torch.no_grad():
        probs = head(hidden, mask).softmax(-1)
        at_zero = head(torch.zeros_like(hidden), mask).softmax(-1)
    pred = probs.argmax(-1)
    attribute = faithfulness.integrated_gradients(n_steps=200, internal_batch_size=64)
    tokens = attribute(head, hidden, mask, pred)
    assert tokens.shape == (3, 6)
    rows = torch.arange(3)
    target = probs[rows, pred] - at_zero[rows, pred]
    torch.testing.assert_close(tokens.sum(-1), target, atol=1e-4, rtol=0)
    assert torch.count_nonzero(tokens[mask]) == 0
    gaps = torch.tensor(attribute.gaps, dtype=torch.double)                      # [3, 2]
    assert (gaps[:, 0] < 1e-4).all()
    torch.testing.assert_close(gaps[:, 1], target.abs(), atol=1e-4, rtol=0)


def test_gradient_x_input_is_the_gradient_of_the_predicted_probability_times_the_input():
    hidden, mask = padded_batch()
    head = standard_heads.ScalarMixMeanHead(3, 8, 4).double().eval()
    pred = torch.tensor([0, 3, 1])
    x = hidden.clone().requires_grad_()
    head(x, mask).softmax(-1)[torch.arange(3), pred].sum().backward()
    torch.testing.assert_close(faithfulness.gradient_x_input(head, hidden, mask, pred), (x.grad * hidden).sum((-2, -1)))


def test_routing_credit_and_attention_weights_rank_tokens_per_sample():
    hidden, mask = padded_batch()
    pred = torch.tensor([0, 1, 2])
    routing = models.RoutingHead(3, 8, 4).double().eval()
    credit = routing_credit(routing, hidden, mask, pred)
    torch.testing.assert_close(credit, routing.credit(hidden, mask)[0].sum(2)[torch.arange(3), :, pred])
    attention = standard_heads.ScalarMixAttentionHead(3, 8, 4).double().eval()
    weights = faithfulness.attention_weights(attention, hidden, mask, pred)
    assert weights.shape == (3, 6) and torch.count_nonzero(weights[mask]) == 0


def test_verdict_names_the_best_method_and_whether_its_lead_is_clear():
    drops = {'head': {'good': {mode: {k: [0.5, 0.6, 0.55, 0.52] for k in faithfulness.KS} for mode in ('delete',)},
                      'bad': {mode: {k: [0.1, 0.12, 0.09, 0.11] for k in faithfulness.KS} for mode in ('delete',)}}}
    for method in drops['head'].values():                                      # insertion: lower is better
        method['insert'] = {k: [1 - v for v in method['delete'][k]] for k in faithfulness.KS}
    lines = faithfulness.verdict(drops)
    assert len(lines) == 2 * len(faithfulness.KS)
    assert all('best good, ahead of bad clearly' in line for line in lines)


@pytest.mark.slow
@pytest.mark.skipif(not (SST_DIR / 'test.txt').is_file(), reason=f"real SST not found at {SST_DIR} (set SST_DIR)")
def test_faithfulness_report_on_a_few_real_sentences(tmp_path):
    (tmp_path / 'sst').symlink_to(SST_DIR.resolve(), target_is_directory=True)
    torch.manual_seed(0)
    standard_heads.ScalarMixAttentionHead(7, 384, 2).save_pretrained(tmp_path / 'b', backbone='minilm')
    report = tmp_path / 'faithfulness.md'
    drops, seconds, shared = faithfulness.main(['--data_root', str(tmp_path), '--attention_head', str(tmp_path / 'b'),
                                                '--n_sentences', '6', '--ig_steps', '2', '--report', str(report)])
    assert shared['n_sentences'] == 6 and (tmp_path / 'faithfulness.png').is_file()
    text = report.read_text()
    for method in ('routing credit', 'integrated gradients', 'gradient x input', 'attention weights', 'random'):
        assert f"| {method} |" in text
    for methods in drops.values():                                              # the same sentences for every method
        assert len({len(m['delete'][5]) for m in methods.values()}) == 1


def test_summary_says_plainly_when_the_heads_own_credit_loses():
    high, low = [0.5, 0.6, 0.55, 0.52], [0.1, 0.12, 0.09, 0.11]
    cell = lambda delete, insert: {'delete': {k: delete for k in faithfulness.KS},
                                   'insert': {k: insert for k in faithfulness.KS}}
    drops = {'routing head': {'routing credit': cell(low, high), 'integrated gradients': cell(high, low),
                              'random': cell(low, high)}}
    seconds = {'routing head': {'routing credit': 0.01, 'integrated gradients': 1.0}}
    text = faithfulness.summary(drops, seconds)
    assert 'less faithful in 6' in text and 'not clearly different in 6' in text            # vs IG; vs random
    assert 'routing credit LOSES to integrated gradients' in text
    assert 'routing credit 10 ms, integrated gradients 1000 ms' in text
    drops['routing head']['routing credit'] = cell(high, low)
    assert 'LOSES' not in faithfulness.summary(drops, seconds)
