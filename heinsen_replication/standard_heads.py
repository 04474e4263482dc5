"""
Standard heads on the same frozen features as RoutingHead, the baselines a reviewer of an "all depths" head asks for
first (train.py --model scalar_mix_mean, scalar_mix_attention, token_depth_attention; FROZEN_HEADS). Same input as
RoutingHead: hidden [..., n_pos, d_depth, d_emb] + mask [..., n_pos].

  ScalarMixMeanHead        (a) learned softmax mix of the depths (ELMo's ScalarMix / SUPERB's weighted sum), masked
                               mean over tokens, Linear
  ScalarMixAttentionHead   (b) the same mix, attention pooling with one learned query (Set Transformer's PMA / timm's
                               AttentionPoolLatent style), Linear; exposes its attention weights
  TokenDepthAttentionHead  (c) attention pooling of all (token, depth) vectors by several learned queries (a PMA
                               block: attention, residual, LayerNorm, feed-forward), Linear; sized to about
                               RoutingHead's parameter count on minilm

Each one's final Linear `classify` is what fine-tuning from a pretrained head trains (LAST_STAGE), the analogue of
RoutingHead's last routing: the layer that maps the pooled representation to class scores.
"""
import torch
import torch.nn as nn

from .models import check_hidden, over_depths
from .pretrained import Pretrained


def _zero_padding(hidden, mask):
    """hidden [..., n_pos, d_depth, d_emb] with padding positions set to 0, so that no padding value (NaN
    included) reaches a sum or a product with an attention weight of 0."""
    return hidden if mask is None else hidden.masked_fill(mask[..., None, None], 0)


def _pool_by_queries(attention, queries, keys, mask):
    """nn.MultiheadAttention `attention` (batch_first, its in_proj and out_proj; no dropout, no bias_k/bias_v) of
    learned queries [n_q, d] over keys = values [..., n_k, d] with padding mask [..., n_k] (True = ignored) ->
    pooled [..., n_q, d], weights averaged over heads [..., n_q, n_k].

    The same function as attention(q, keys, keys, key_padding_mask=mask), computed in the order that suits few
    queries over many keys. Per head h (d_head = d / n_heads):
      scores_h = (q_h W_k,h / sqrt(d_head)) . x_k   (q_h . b_k,h is the same for every key: it cancels in softmax)
      pooled_h = (sum_k a_hk x_k) W_v,h^T + b_v,h    (the weights a_hk sum to 1 over the keys)
    so the keys are multiplied by n_heads * n_q query vectors instead of being projected to keys and values: for
    8 queries of 4 heads over 384-wide vectors, 24x fewer multiply-adds over the keys."""
    n_heads, d = attention.num_heads, queries.shape[-1]
    W_q, W_k, W_v = attention.in_proj_weight.view(3, n_heads, d // n_heads, d)    # each [n_heads, d_head, d]
    b_q, _, b_v = attention.in_proj_bias.view(3, n_heads, d // n_heads)          # each [n_heads, d_head]
    q = torch.einsum('qd,hed->hqe', queries, W_q) + b_q[:, None]                 # [n_heads, n_q, d_head]
    q_in_key_space = torch.einsum('hqe,hed->hqd', q, W_k) * (d // n_heads) ** -0.5   # [n_heads, n_q, d]
    scores = torch.einsum('...kd,hqd->...hqk', keys, q_in_key_space)             # [..., n_heads, n_q, n_k]
    if mask is not None:
        scores = scores.masked_fill(mask[..., None, None, :], float('-inf'))
    weights = scores.softmax(dim=-1)                                             # [..., n_heads, n_q, n_k]
    pooled_keys = torch.einsum('...hqk,...kd->...hqd', weights, keys)            # [..., n_heads, n_q, d]
    heads = torch.einsum('...hqd,hed->...qhe', pooled_keys, W_v) + b_v          # [..., n_q, n_heads, d_head]
    return attention.out_proj(heads.flatten(-2)), weights.mean(dim=-3)          # [..., n_q, d], [..., n_q, n_k]


class ScalarMix(nn.Module):
    """hidden [..., d_depth, d_emb] -> gamma * sum_l softmax(s)_l * LayerNorm(hidden_l), [..., d_emb] (Peters et
    al., 2018, with do_layer_norm; SUPERB's weighted sum with normalised layers). Each depth is layer-normalised
    (no affine), as RoutingHead normalises it, so that depths of different scales mix on equal terms."""

    def __init__(self, d_depth, d_emb):
        super().__init__()
        self.normalize = nn.LayerNorm(d_emb, elementwise_affine=False)
        self.scalars = nn.Parameter(torch.zeros(d_depth))                        # [d_depth], softmax: the weights
        self.gamma = nn.Parameter(torch.ones(()))                                # []

    def forward(self, hidden):
        weights = self.scalars.softmax(dim=-1)                                   # [d_depth]
        return self.gamma * torch.einsum('...le,l->...e', self.normalize(hidden), weights)


class ScalarMixMeanHead(nn.Module, Pretrained):
    """(a) hidden [..., n_pos, d_depth, d_emb] -> ScalarMix -> mean over non-padding tokens -> Linear ->
    class scores [..., n_classes]."""
    LAST_STAGE = 'classify.'

    def __init__(self, d_depth, d_emb, n_classes):
        super().__init__()
        self.d_depth, self.d_emb, self.n_classes = d_depth, d_emb, n_classes
        self.mix = ScalarMix(d_depth, d_emb)
        self.classify = nn.Linear(d_emb, n_classes)

    def forward(self, hidden, mask=None):
        """hidden [..., n_pos, d_depth, d_emb]; mask [..., n_pos] bool, True = padding."""
        check_hidden(hidden, mask, self.d_depth, self.d_emb)
        x = self.mix(_zero_padding(hidden, mask))                                # [..., n_pos, d_emb]
        if mask is None:
            pooled = x.mean(dim=-2)                                              # [..., d_emb]
        else:
            keep = (~mask)[..., None].to(x.dtype)                                # [..., n_pos, 1]
            pooled = (x * keep).sum(dim=-2) / keep.sum(dim=-2).clamp(min=1)      # [..., d_emb]
        return self.classify(pooled)                                             # [..., n_classes]


class ScalarMixAttentionHead(nn.Module, Pretrained):
    """(b) hidden [..., n_pos, d_depth, d_emb] -> ScalarMix -> attention pooling over tokens with one learned query
    (nn.MultiheadAttention, n_heads heads; padding is never attended) -> Linear -> class scores [..., n_classes].
    attention_weights() gives the pooling's weight of each token (averaged over heads)."""
    LAST_STAGE = 'classify.'

    def __init__(self, d_depth, d_emb, n_classes, n_heads=4):
        super().__init__()
        self.d_depth, self.d_emb, self.n_classes, self.n_heads = d_depth, d_emb, n_classes, n_heads
        self.mix = ScalarMix(d_depth, d_emb)
        self.query = nn.Parameter(torch.randn(1, d_emb) * d_emb ** -0.5)         # [1, d_emb]
        self.attend = nn.MultiheadAttention(d_emb, n_heads, batch_first=True)
        self.classify = nn.Linear(d_emb, n_classes)

    def _pool(self, hidden, mask):
        check_hidden(hidden, mask, self.d_depth, self.d_emb)
        x = self.mix(_zero_padding(hidden, mask))                                # [..., n_pos, d_emb]
        pooled, weights = _pool_by_queries(self.attend, self.query, x, mask)     # [..., 1, d_emb], [..., 1, n_pos]
        return self.classify(pooled.squeeze(-2)), weights.squeeze(-2)            # [..., n_classes], [..., n_pos]

    def forward(self, hidden, mask=None):
        """hidden [..., n_pos, d_depth, d_emb]; mask [..., n_pos] bool, True = padding."""
        return self._pool(hidden, mask)[0]

    @torch.no_grad()
    def attention_weights(self, hidden, mask=None):
        """-> the pooling's attention weight of each token [..., n_pos] (0 at padding; sums to 1), and the class
        scores [..., n_classes]."""
        scores, weights = self._pool(hidden, mask)
        return weights, scores


class TokenDepthAttentionHead(nn.Module, Pretrained):
    """(c) hidden [..., n_pos, d_depth, d_emb] -> LayerNorm (no affine) then x * W + B per depth, as RoutingHead ->
    the n_pos * d_depth (token, depth) vectors pooled by n_queries learned queries in a PMA block (Lee et al., 2019:
    H = LN(Q + MultiheadAttention(Q, X, X)), LN(H + FF(H)), FF = Linear-GELU-Linear of width d_ff) -> the n_queries
    vectors concatenated -> Linear -> class scores [..., n_classes]. The defaults give about RoutingHead's parameter
    count on minilm (7 depths x 384)."""
    LAST_STAGE = 'classify.'

    def __init__(self, d_depth, d_emb, n_classes, n_queries=8, n_heads=4, d_ff=384):
        super().__init__()
        self.d_depth, self.d_emb, self.n_classes = d_depth, d_emb, n_classes
        self.n_queries, self.n_heads, self.d_ff = n_queries, n_heads, d_ff
        self.normalize = nn.LayerNorm(d_emb, elementwise_affine=False)
        self.W = nn.Parameter(torch.ones(d_depth, d_emb))                         # [d_depth, d_emb]
        self.B = nn.Parameter(torch.zeros(d_depth, d_emb))                        # [d_depth, d_emb]
        self.queries = nn.Parameter(torch.randn(n_queries, d_emb) * d_emb ** -0.5)   # [n_queries, d_emb]
        self.attend = nn.MultiheadAttention(d_emb, n_heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d_emb), nn.LayerNorm(d_emb)
        self.feed_forward = nn.Sequential(nn.Linear(d_emb, d_ff), nn.GELU(), nn.Linear(d_ff, d_emb))
        self.classify = nn.Linear(n_queries * d_emb, n_classes)

    def forward(self, hidden, mask=None):
        """hidden [..., n_pos, d_depth, d_emb]; mask [..., n_pos] bool, True = padding."""
        check_hidden(hidden, mask, self.d_depth, self.d_emb)
        x = self.normalize(_zero_padding(hidden, mask)) * self.W + self.B         # [..., n_pos, d_depth, d_emb]
        x = x.flatten(-3, -2)                                                    # [..., n_pos * d_depth, d_emb]
        flat_mask = None if mask is None else over_depths(mask, self.d_depth)   # [..., n_pos * d_depth]
        pooled, _ = _pool_by_queries(self.attend, self.queries, x, flat_mask)    # [..., n_queries, d_emb]
        h = self.norm1(self.queries + pooled)                                    # [..., n_queries, d_emb]
        h = self.norm2(h + self.feed_forward(h))                                 # [..., n_queries, d_emb]
        return self.classify(h.flatten(-2))                                      # [..., n_classes]


FROZEN_HEADS = {'scalar_mix_mean': ScalarMixMeanHead, 'scalar_mix_attention': ScalarMixAttentionHead,
                'token_depth_attention': TokenDepthAttentionHead}               # train.py --model name -> class
