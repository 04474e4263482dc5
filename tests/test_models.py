"""models.py: RoutingHead (spec layout), frozen backbones, MultiModalClassifier."""
import pytest
import torch

from benchmarks.reference import spec_state_shapes
from heinsen_replication import backbones, models
from heinsen_replication.classifier import MultiModalClassifier


def test_routing_head_state_dict_is_the_published_layout_and_loads_strict():
    d_depth, d_emb, n_classes = 5, 16, 3
    head = models.RoutingHead(d_depth, d_emb, n_classes)
    expected = {'W': (d_depth, d_emb), 'B': (d_depth, d_emb)}
    for k, (n_inp, n_out, d_out) in enumerate([(-1, 64, d_emb), (64, 64, d_emb), (64, n_classes, 1)]):
        expected.update({f'route.{k}.{name}': shape for name, shape in spec_state_shapes(n_inp, n_out, d_emb, d_out).items()})
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == expected
    checkpoint = {k: torch.randn(shape) for k, shape in expected.items()}    # a published head's layout
    models.RoutingHead(d_depth, d_emb, n_classes).load_state_dict(checkpoint, strict=True)
    assert torch.equal(head.W, torch.ones(d_depth, d_emb)) and torch.count_nonzero(head.B) == 0


def test_routing_head_forward_equals_spec_composition():
    head = models.RoutingHead(3, 8, 4, n_hid=6)
    hidden = torch.randn(2, 5, 3, 8)
    x = torch.nn.functional.layer_norm(hidden, (8,)) * head.W + head.B
    x = x.reshape(2, 15, 8)
    for route in head.route:
        x = route(x)
    torch.testing.assert_close(head(hidden), x.squeeze(-1))
    assert head(hidden).shape == (2, 4)
    assert head(hidden[0]).shape == (4,)                                     # no batch dim


def test_routing_head_padding_equals_unpadded_and_credit_is_zero_there():
    torch.manual_seed(0)
    head = models.RoutingHead(3, 8, 4, n_hid=6).double()
    hidden = torch.randn(2, 7, 3, 8, dtype=torch.double)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 4:] = True
    scores = head(hidden, mask)
    torch.testing.assert_close(scores[1], head(hidden[1, :4]))
    credit, credit_scores = head.credit(hidden, mask)
    assert credit.shape == (2, 7, 3, 4)
    torch.testing.assert_close(credit_scores, scores.detach())
    assert torch.count_nonzero(credit[1, 4:]) == 0 and torch.count_nonzero(credit[1, :4]) > 0
    torch.testing.assert_close(credit[1, :4], head.credit(hidden[1, :4])[0])   # independent of the batch's padding


def test_routing_head_bad_input():
    head = models.RoutingHead(3, 8, 4)
    with pytest.raises(ValueError, match=r'hidden must have shape \[\.\.\., n_pos, d_depth=3, d_emb=8\]'):
        head(torch.randn(2, 5, 4, 8))
    with pytest.raises(ValueError, match='mask must be a bool tensor'):
        head(torch.randn(2, 5, 3, 8), torch.zeros(2, 5))


@pytest.mark.parametrize('fixture', ['tiny_bert', 'tiny_roberta'])
def test_text_backbone_scores_do_not_depend_on_the_batch(fixture, request):
    torch.manual_seed(0)
    clf = MultiModalClassifier(request.getfixturevalue(fixture), n_classes=3).double()
    short, long = "a lovely film", "a long and winding story about a film that never ends, told twice over and again"
    alone = clf([short])
    batched = clf([long, short, "bad"])
    torch.testing.assert_close(batched[1], alone[0])
    assert not any(p.requires_grad for p in clf.backbone.parameters())
    clf.train()
    assert not clf.backbone.training and clf.head.training


def test_long_text_is_split_into_chunks_and_every_token_is_routed(tiny_bert):
    backbone = backbones.load_backbone(tiny_bert, max_length=16)
    assert backbone.max_length == 16 and backbone.d_depth == 3 and backbone.d_emb == 32
    text = ' '.join(f'word{k}' for k in range(40))
    n_tokens = len(backbone.tokenizer(text, add_special_tokens=False)['input_ids'])
    n_chunks = -(-n_tokens // 14)                                            # 14 content tokens + [CLS] [SEP] each
    hidden, mask = backbone.encode([text, 'short'])
    assert (~mask[0]).sum() == n_tokens + 2 * n_chunks                       # all tokens of all chunks, re-joined
    assert hidden.shape == (2, n_tokens + 2 * n_chunks, 3, 32)
    assert torch.count_nonzero(hidden[1][mask[1]]) == 0
    head = models.RoutingHead(3, 32, 2)
    credit, _ = head.credit(hidden, mask)
    assert (credit[0].abs().sum(dim=(-2, -1)) > 0).all()                   # every token of the long text gets credit
    assert torch.count_nonzero(credit[1][mask[1]]) == 0


def test_image_backbones_yield_all_depths(tiny_beit):
    beit = backbones.load_backbone(tiny_beit)
    assert beit.modality == 'image' and beit.d_depth == 3
    hidden, mask = beit.encode(torch.randn(2, 3, 32, 32))
    assert hidden.shape == (2, 1 + 4, 3, 32) and mask is None
    vit = backbones.load_backbone('timm/vit_tiny_patch16_224', pretrained=False)
    hidden, mask = vit.encode(torch.randn(1, 3, 224, 224))
    assert hidden.shape == (1, 1 + 196, 13, 192)
    clf = MultiModalClassifier(beit, n_classes=4)
    assert clf(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_minilm_is_the_offline_default():
    backbone = backbones.load_backbone('minilm')
    assert (backbone.modality, backbone.d_depth, backbone.d_emb) == ('text', 7, 384)
    hidden, mask = backbone.encode(["it 's a lovely film ."])
    assert hidden.shape[2:] == (7, 384) and not mask.any()


def test_unknown_backbone_and_bad_batches(tiny_bert, tiny_beit):
    with pytest.raises(ValueError, match="unknown backbone 'no-such-model'"):
        backbones.load_backbone('no-such-model')
    with pytest.raises(ValueError, match='list of strings'):
        backbones.load_backbone(tiny_bert).encode('one string')
    with pytest.raises(ValueError, match=r'tensor \[batch, channels, height, width\]'):
        backbones.load_backbone(tiny_beit).encode(torch.randn(3, 32, 32))


def test_routing_head_learns_a_synthetic_task():
    """Class = which of 3 directions is planted at a random position and depth; loss falls."""
    torch.manual_seed(0)
    directions = torch.randn(3, 16) * 3
    def batch(n=32):
        labels = torch.randint(0, 3, (n,))
        hidden = torch.randn(n, 6, 2, 16)
        hidden[torch.arange(n), torch.randint(0, 6, (n,)), torch.randint(0, 2, (n,))] += directions[labels]
        return hidden, labels
    head = models.RoutingHead(2, 16, 3, n_hid=8)
    optimizer = torch.optim.RAdam(head.parameters(), lr=1e-2)
    losses = []
    for step in range(150):
        hidden, labels = batch()
        loss = torch.nn.functional.cross_entropy(head(hidden), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    hidden, labels = batch(256)
    assert (head(hidden).argmax(-1) == labels).float().mean() > 0.8


def test_encode_rows_runs_equal_length_batches_without_padding(tiny_bert):
    """The feature store's encoder: each chunk's states are those of the chunk run alone; the model only ever sees
    batches of chunks of one length, with no padding and no attention mask; lengths count every chunk's tokens."""
    backbone = backbones.load_backbone(tiny_bert, max_length=16)
    texts = ['a good film', 'bad', ' '.join(f'word{k}' for k in range(30)), 'a bad film', 'fine']
    seen = []
    hook = backbone.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((tuple(kwargs['input_ids'].shape), 'attention_mask' in kwargs)),
        with_kwargs=True)
    try:
        rows, lengths = backbone.encode_rows(texts, dtype=torch.float64, max_tokens=40)
    finally:
        hook.remove()
    assert rows.dtype == torch.float64 and rows.shape == (sum(lengths), 3, 32)
    assert not any(masked for _, masked in seen) and all(b * n <= 40 or b == 1 for (b, n), _ in seen)
    tokens = backbone.tokenizer(texts, max_length=16, truncation=True, return_overflowing_tokens=True)
    assert sorted(n for (b, n), _ in seen for _ in range(b)) == sorted(len(ids) for ids in tokens['input_ids'])
    expected = {b: [] for b in range(len(texts))}
    with torch.no_grad():
        for sample, ids in zip(tokens['overflow_to_sample_mapping'], tokens['input_ids']):
            out = backbone.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            expected[sample].append(torch.stack(out, dim=-2)[0])                  # [n_tok, d_depth, d_emb]
    for b, text_rows in enumerate(rows.split(lengths)):
        torch.testing.assert_close(text_rows.float(), torch.cat(expected[b]), rtol=1e-4, atol=1e-5)
    assert backbone.token_counts(texts) == lengths
    hidden, mask = backbone.encode(texts)
    assert (~mask).sum(dim=1).tolist() == lengths
    torch.testing.assert_close(hidden[~mask], rows.float())
