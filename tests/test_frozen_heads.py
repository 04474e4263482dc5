"""models.py: the standard heads on frozen features of all depths (issue 21) -- ScalarMixMeanHead,
ScalarMixAttentionHead, TokenDepthAttentionHead: shapes, padding, saving and loading, bad input."""
import pytest
import torch

from heinsen_replication import checkpoints, models, standard_heads

HEADS = sorted(standard_heads.FROZEN_HEADS.items())
D_DEPTH, D_EMB, N_CLASSES = 3, 8, 4


def small(cls):
    """A small head of each kind (TokenDepthAttentionHead with fewer queries and a narrow feed-forward)."""
    extra = {'n_queries': 2, 'd_ff': 16, 'n_heads': 2} if cls is standard_heads.TokenDepthAttentionHead else {}
    extra = {'n_heads': 2} if cls is standard_heads.ScalarMixAttentionHead else extra
    torch.manual_seed(0)
    return cls(D_DEPTH, D_EMB, N_CLASSES, **extra).double().eval()


@pytest.mark.parametrize('name, cls', HEADS)
def test_shapes_with_and_without_batch_dims(name, cls):
    head = small(cls)
    hidden = torch.randn(2, 5, 6, D_DEPTH, D_EMB, dtype=torch.double)          # two leading dims
    assert head(hidden).shape == (2, 5, N_CLASSES)
    assert head(hidden[0, 0]).shape == (N_CLASSES,)                            # no batch dim
    torch.testing.assert_close(head(hidden)[1, 2], head(hidden[1, 2]))
    mask = torch.zeros(2, 5, 6, dtype=torch.bool)
    torch.testing.assert_close(head(hidden, mask), head(hidden))               # an all-False mask is no mask


@pytest.mark.parametrize('name, cls', HEADS)
def test_padding_never_changes_scores(name, cls):
    """Each sample's scores equal those of its unpadded states, whatever the padding holds (NaN, huge values)."""
    head = small(cls)
    hidden = torch.randn(3, 7, D_DEPTH, D_EMB, dtype=torch.double)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:], mask[1, 5:] = True, True
    hidden[0, 2:] = float('nan')
    hidden[1, 5:] = 1e6
    scores = head(hidden, mask)
    assert torch.isfinite(scores).all()
    for b, length in enumerate((2, 5, 7)):
        torch.testing.assert_close(scores[b], head(hidden[b, :length]))
    hidden[~mask] += torch.randn_like(hidden[~mask])                          # and the scores do see the tokens
    assert not torch.allclose(head(hidden, mask), scores)


def test_attention_weights_are_a_distribution_over_tokens_zero_at_padding():
    head = small(standard_heads.ScalarMixAttentionHead)
    hidden = torch.randn(2, 6, D_DEPTH, D_EMB, dtype=torch.double)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 3:] = True
    weights, scores = head.attention_weights(hidden, mask)
    assert weights.shape == (2, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, dtype=torch.double))
    assert torch.count_nonzero(weights[1, 3:]) == 0 and (weights[1, :3] > 0).all()
    torch.testing.assert_close(scores, head(hidden, mask))
    torch.testing.assert_close(weights[1, :3], head.attention_weights(hidden[1, :3])[0])


@pytest.mark.parametrize('name, cls', HEADS)
def test_save_load_round_trip(name, cls, tmp_path):
    head = small(cls)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)                                  # not the initialisation
    head.save_pretrained(tmp_path / name, backbone='minilm', training={'model': name})
    loaded, config = checkpoints.from_pretrained(tmp_path / name)
    assert type(loaded) is cls and config['model_type'] == cls.__name__ and config['backbone'] == 'minilm'
    assert (config['d_depth'], config['d_emb'], config['n_classes']) == (D_DEPTH, D_EMB, N_CLASSES)
    hidden = torch.randn(2, 5, D_DEPTH, D_EMB, dtype=torch.double)
    torch.testing.assert_close(loaded.double().eval()(hidden), head(hidden))
    with pytest.raises(ValueError, match='not a RoutingHead'):
        models.RoutingHead.from_pretrained(tmp_path / name)


@pytest.mark.parametrize('name, cls', HEADS)
def test_bad_input_is_a_one_line_error(name, cls):
    head = small(cls)
    with pytest.raises(ValueError, match=r'hidden must have shape \[\.\.\., n_pos, d_depth=3, d_emb=8\]') as e:
        head(torch.randn(2, 5, D_DEPTH + 1, D_EMB, dtype=torch.double))
    assert '\n' not in str(e.value)
    with pytest.raises(ValueError, match='mask must be a bool tensor') as e:
        head(torch.randn(2, 5, D_DEPTH, D_EMB, dtype=torch.double), torch.zeros(2, 5))
    assert '\n' not in str(e.value)


def test_token_depth_attention_head_has_about_the_routing_heads_parameter_count():
    count = lambda m: sum(p.numel() for p in m.parameters())
    for n_classes in (5, 2):                                                   # minilm SST-5 and SST-2
        routing = count(models.RoutingHead(7, 384, n_classes))
        assert abs(count(standard_heads.TokenDepthAttentionHead(7, 384, n_classes)) / routing - 1) < 0.2


@pytest.mark.parametrize('name, cls', HEADS)
def test_every_parameter_learns(name, cls):
    head = small(cls).train()
    hidden = torch.randn(4, 5, D_DEPTH, D_EMB, dtype=torch.double)
    head(hidden).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in head.parameters())


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(standard_heads.FROZEN_HEADS))
def test_train_sst5_then_sst2_fine_tunes_only_the_final_linear(name, tiny_sst, tiny_bert, tmp_path):
    """train.py --model <head>: the routing head's regime; SST-2 from the SST-5 head trains only `classify` (the
    analogue of the last routing), every other tensor stays the SST-5 head's."""
    import train
    from heinsen_replication import recipes
    stages = recipes.runs('frozen-heads', data_root=str(tiny_sst), out=str(tmp_path), feature_cache=str(tmp_path / 'c'),
                          heads=(name,))
    small = ['--n_epochs', '2', '--n_iters_per_train_epoch', '3', '--batch_sz', '4', '--device', 'cpu']
    for dataset in ('sst5', 'sst2'):
        train.main([*stages[f'{name}/{dataset}'], *small])             # later options override the recipe's
    sst5, config5 = checkpoints.from_pretrained(tmp_path / 'frozen-heads' / name / 'seed0' / 'sst5' / 'model')
    sst2, config2 = checkpoints.from_pretrained(tmp_path / 'frozen-heads' / name / 'seed0' / 'sst2' / 'model')
    assert type(sst5) is type(sst2) is standard_heads.FROZEN_HEADS[name]
    assert (config5['n_classes'], config2['n_classes']) == (5, 2) and config2['training']['model'] == name
    for key, tensor in sst2.state_dict().items():
        assert key.startswith('classify.') or torch.equal(tensor, sst5.state_dict()[key]), key
    assert train.REGIMES[name] == train.REGIMES['routing_head']


def test_pooling_by_queries_is_multihead_attention():
    """_pool_by_queries folds the queries into the key projection and projects the values after pooling: the same
    outputs, attention weights and gradients as nn.MultiheadAttention's own forward, padding included."""
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(12, 3, batch_first=True).double()
    torch.nn.init.normal_(attention.in_proj_bias)                              # nonzero biases, b_k included
    queries = torch.randn(2, 12, dtype=torch.double, requires_grad=True)
    keys = torch.randn(4, 6, 12, dtype=torch.double, requires_grad=True)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, 4:], mask[3, 1:] = True, True
    ours = standard_heads._pool_by_queries(attention, queries, keys, mask)
    theirs = attention(queries.expand(4, 2, 12), keys, keys, key_padding_mask=mask)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    inputs = [queries, keys, *attention.parameters()]
    cotangent = torch.randn_like(ours[0])
    for a, b in zip(torch.autograd.grad((ours[0] * cotangent).sum(), inputs),
                    torch.autograd.grad((theirs[0] * cotangent).sum(), inputs)):
        torch.testing.assert_close(a, b)
