"""
The models: the 2022 paper's routing head and the 2019 paper's capsule networks.

  RoutingHead            the 2022 paper's classification head: hidden states of ALL depths of a
                         frozen transformer routed by three EfficientVectorRoutings to class scores.
  SmallNORBClassifier    the 2019 paper's smallNORB capsule network (the published architecture), trained end
                         to end: a small conv net on the stereo pair + coordinate grid, then two Routings.
  SSTClassifier          the 2019 paper's text model (the published architecture): the frozen hidden states of
                         all depths as 1 x d_inp capsules, routed by two Routings to class capsules.

Each saves and loads with save_pretrained / from_pretrained (pretrained.Pretrained). Padding convention
everywhere: mask [batch, n_pos] bool, True = padding (ignored), matching the library's masks (True = that input
is ignored).
"""
import torch
import torch.nn as nn

from heinsen_routing import EfficientVectorRouting, Routing, end_to_end_credit, record_credit
from heinsen_routing.checks import check_dims

from .pretrained import Pretrained

# -------------------------------------------------------------------------------------------------
# The routing head (2022)
# -------------------------------------------------------------------------------------------------


def over_depths(mask, d_depth):
    """[..., n_pos] -> [..., n_pos * d_depth]: each position's value for every one of its depths (the order in
    which the models flatten hidden states [..., n_pos, d_depth, d_emb] to n_pos * d_depth inputs)."""
    return mask[..., None].expand(*mask.shape, d_depth).flatten(-2)


def check_hidden(hidden, mask, d_depth, d_emb):
    """Hidden states of all depths [..., n_pos, d_depth, d_emb] and their padding mask [..., n_pos]."""
    if not torch.is_tensor(hidden) or hidden.dim() < 3 or tuple(hidden.shape[-2:]) != (d_depth, d_emb):
        got = tuple(hidden.shape) if torch.is_tensor(hidden) else type(hidden).__name__
        raise ValueError(f"hidden must have shape [..., n_pos, d_depth={d_depth}, d_emb={d_emb}], got {got}")
    if mask is not None and (not torch.is_tensor(mask) or mask.dtype != torch.bool
                             or tuple(mask.shape) != tuple(hidden.shape[:-2])):
        got = f"{mask.dtype} {list(mask.shape)}" if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor [..., n_pos] = {list(hidden.shape[:-2])} "
                         f"(True = padding), got {got}")


class RoutingHead(nn.Module, Pretrained):
    """Hidden states of all depths [..., n_pos, d_depth, d_emb] -> class scores [..., n_classes].

    Layer norm over d_emb (no affine), then x * W + B per depth, flatten to n_pos * d_depth input
    vectors, and three routings: (-1 -> n_hid), (n_hid -> n_hid), (n_hid -> n_classes, d_out 1).
    State dict keys: W, B, route.0.*, route.1.*, route.2.* (the authors' published heads load strict).
    Lighter variants (benchmarks/routing_head_study.py measures them; the defaults are the paper's head, unchanged):
    n_routings=2 drops the middle routing, (-1 -> n_hid), (n_hid -> n_classes); d_hid projects each vector from
    d_emb to d_hid features (`project`, a Linear without bias, after x * W + B), so that the routings work at width
    d_hid.
    chunk_elements: the routings' chunk size (EfficientVectorRouting's; None = a fixed size per device type, never
    the memory free). It changes speed and memory, and results only in their last bits (sums in another order:
    docs/library.md); it can be changed on a loaded head with set_chunk_elements.
    """

    CONFIG_CHOICES = {'n_routings': (2, 3)}                 # what config.json may hold (check_config)
    OPTIONAL_SIZES = ('d_hid', 'chunk_elements')            # sizes whose default, None, is no size
    # Named configurations (RoutingHead.named, train.py --head_config): the paper's head, and the lightest
    # configuration of the routing-head study that held its accuracy (docs/routing_head_study.md, docs/choosing_a_head.md)
    CONFIGURATIONS = {'paper': {'n_hid': 64, 'n_routings': 3, 'd_hid': None},
                      'light': {'n_hid': 16, 'n_routings': 3, 'd_hid': 128}}

    def __init__(self, d_depth, d_emb, n_classes, n_hid=64, chunk_elements=None, n_routings=3, d_hid=None):
        check_dims(d_depth=d_depth, d_emb=d_emb, n_classes=n_classes, n_hid=n_hid)
        super().__init__()
        if isinstance(n_routings, bool) or n_routings not in self.CONFIG_CHOICES['n_routings']:
            raise ValueError(f"n_routings must be 3 (the paper's head) or 2 (without the middle routing), "
                             f"got {n_routings!r}")
        if d_hid is not None:
            check_dims(d_hid=d_hid)
        self.d_depth, self.d_emb, self.n_classes, self.n_hid = d_depth, d_emb, n_classes, n_hid
        self.n_routings, self.d_hid = n_routings, d_hid
        d_route = d_emb if d_hid is None else d_hid                               # the routed vectors' width
        self.normalize = nn.LayerNorm(d_emb, elementwise_affine=False)
        self.W = nn.Parameter(torch.ones(d_depth, d_emb))                         # [d_depth, d_emb]
        self.B = nn.Parameter(torch.zeros(d_depth, d_emb))                        # [d_depth, d_emb]
        if d_hid is not None:
            self.project = nn.Linear(d_emb, d_hid, bias=False)                    # weight [d_hid, d_emb]
            nn.init.normal_(self.project.weight, std=d_emb ** -0.5)               # unit-variance inputs stay so
        self.route = nn.ModuleList([EfficientVectorRouting(n_inp=-1, n_out=n_hid, d_inp=d_route, d_out=d_route)])
        for _ in range(n_routings - 2):                                           # the paper's route.1
            self.route.append(EfficientVectorRouting(n_inp=n_hid, n_out=n_hid, d_inp=d_route, d_out=d_route))
        self.route.append(EfficientVectorRouting(n_inp=n_hid, n_out=n_classes, d_inp=d_route, d_out=1))
        self.set_chunk_elements(chunk_elements)

    @classmethod
    def named(cls, name, d_depth, d_emb, n_classes, chunk_elements=None):
        """The routing head of a named configuration (CONFIGURATIONS: 'paper', 'light'); saved and loaded like
        any other (its config.json holds the sizes)."""
        if name not in cls.CONFIGURATIONS:
            raise ValueError(f"name must be one of {', '.join(map(repr, cls.CONFIGURATIONS))}, got {name!r}")
        return cls(d_depth, d_emb, n_classes, chunk_elements=chunk_elements, **cls.CONFIGURATIONS[name])

    def set_chunk_elements(self, chunk_elements):
        """The chunk size of the streamed routings (None = per device, see the class docstring)."""
        if chunk_elements is not None:
            check_dims(chunk_elements=chunk_elements)
        for routing in self.route:
            routing.chunk_elements = chunk_elements

    def forward(self, hidden, mask=None):
        """hidden [..., n_pos, d_depth, d_emb]; mask [..., n_pos] bool, True = padding."""
        check_hidden(hidden, mask, self.d_depth, self.d_emb)
        x = self.normalize(hidden) * self.W + self.B                             # [..., n_pos, d_depth, d_emb]
        if self.d_hid is not None:
            x = self.project(x)                                                  # [..., n_pos, d_depth, d_hid]
        x = x.flatten(-3, -2)                                                    # [..., n_pos * d_depth, d_route]
        if mask is not None:
            mask = over_depths(mask, self.d_depth)[..., None]                    # [..., n_pos * d_depth, 1]
        x = self.route[0](x, mask=mask)                                          # [..., n_hid, d_route]
        for routing in self.route[1:-1]:                                         # the paper's head: route.1
            x = routing(x)                                                       # [..., n_hid, d_route]
        x = self.route[-1](x)                                                    # [..., n_classes, 1]
        return x.squeeze(-1)                                                     # [..., n_classes]

    @torch.no_grad()
    def credit(self, hidden, mask=None):
        """End-to-end credit of each (position, depth) for each class -> [..., n_pos, d_depth, n_classes],
        and the scores [..., n_classes]. Padding positions get zero credit."""
        with record_credit(self) as phis:
            scores = self(hidden, mask)
        credit = end_to_end_credit(phis, mask=None if mask is None else over_depths(mask, self.d_depth))
        # credit: [..., n_pos * d_depth, n_classes]
        return credit.unflatten(-2, (hidden.shape[-3], self.d_depth)), scores


# -------------------------------------------------------------------------------------------------
# The capsule networks (2019), as published: matrix capsules routed by Routing (GenerativeMatrixRouting).
# The authors' state dicts load strict: SmallNORBClassifier convolve.*, compute_a.{0,1}.*, compute_mu.{0,1}.*,
# routings.{0,1}.*; SSTClassifier depth_emb, detect_parts.0.* (Linear), detect_parts.2.* (LayerNorm), routings.{0,1}.*
# -------------------------------------------------------------------------------------------------

class SmallNORBClassifier(nn.Module, Pretrained):
    """The 2019 paper's smallNORB network, the published architecture (its state dict loads strict):
    stereo images [batch, 2, H, W] (smallNORB: 96 x 96, values in [0, 1]) -> (a_out [batch, n_objs],
    mu_out [batch, n_objs, 4, 4], sig2_out [batch, n_objs, 4, 4]); the class scores are a_out.

    1. Two coordinate channels follow the pair: channel 2 varies down the rows, channel 3 across the
       columns (each linspace(-1, 1)).
    2. `convolve`: six blocks BatchNorm2d -> 3 x 3 Conv2d (no padding) -> Swish, strides 1, 2, 1, 2, 1, 2
       (96 x 96 -> 9 x 9 positions).
    3. `compute_a`, `compute_mu`: BatchNorm2d -> 1 x 1 Conv2d, the n_parts part scores and 4 x 4 part
       poses at each position (channel p * 16 + e = element e, row-major, of part p's pose).
    4. The n_parts * h * w part capsules, part-major (index p * h * w + r * w + c), are routed to
       n_parts capsules, then to the n_objs object capsules.
    """

    def __init__(self, n_objs=5, n_parts=64, d_chns=64):
        super().__init__()
        self.n_objs, self.n_parts, self.d_chns = n_objs, n_parts, d_chns
        blocks = []
        for k in range(6):
            d_in = 2 + 2 if k == 0 else d_chns                                   # stereo pair + (row, column) grid
            conv = nn.Conv2d(d_in, d_chns, kernel_size=3, stride=1 + k % 2)
            nn.init.kaiming_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
            blocks += [nn.BatchNorm2d(d_in), conv, nn.SiLU()]                    # SiLU = Swish: x * sigmoid(x)
        self.convolve = nn.Sequential(*blocks)
        self.compute_a = nn.Sequential(nn.BatchNorm2d(d_chns), nn.Conv2d(d_chns, n_parts, kernel_size=1))
        self.compute_mu = nn.Sequential(nn.BatchNorm2d(d_chns), nn.Conv2d(d_chns, n_parts * 4 * 4, kernel_size=1))
        self.routings = nn.ModuleList([
            Routing(d_cov=4, d_inp=4, d_out=4, n_out=n_parts),                  # variable n_inp
            Routing(d_cov=4, d_inp=4, d_out=4, n_inp=n_parts, n_out=n_objs),
        ])

    def forward(self, images):
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 2 or min(images.shape[-2:]) < 32:
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a stereo batch [batch, 2, H, W] with H, W >= 32 (smallNORB: 96 x 96), "
                             f"got {got}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point (values in [0, 1]), got {images.dtype}")
        batch, _, height, width = images.shape
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, height, device=images.device, dtype=images.dtype),
                                    torch.linspace(-1, 1, width, device=images.device, dtype=images.dtype),
                                    indexing='ij')                               # each [H, W]
        grid = torch.stack([rows, cols]).expand(batch, -1, -1, -1)              # [batch, 2, H, W]
        z = self.convolve(torch.cat([images, grid], dim=1))                     # [batch, d_chns, h, w]
        h, w = z.shape[-2:]
        a = self.compute_a(z).flatten(1)                                         # [batch, n_parts * h * w]
        mu = self.compute_mu(z).view(batch, self.n_parts, 4, 4, h, w)            # [batch, n_parts, 4, 4, h, w]
        mu = mu.permute(0, 1, 4, 5, 2, 3).reshape(batch, -1, 4, 4)               # [batch, n_parts * h * w, 4, 4]
        for routing in self.routings:
            a, mu, sig2 = routing(a, mu)                 # [batch, n_out], [batch, n_out, 4, 4], [batch, n_out, 4, 4]
        return a, mu, sig2


class SSTClassifier(nn.Module, Pretrained):
    """Hidden states of all depths of a frozen transformer [batch, n_pos, d_depth, d_emb] and their
    padding mask [batch, n_pos] (True = padding) -> (a_out [batch, n_classes], mu_out [batch,
    n_classes, 1, d_cap], sig2_out [same]); the class scores are a_out.

    A learned embedding of each depth is added to the hidden states, then Linear -> Swish ->
    LayerNorm gives d_inp features: each (position, depth) is a 1 x d_inp capsule whose score is
    the logit of its mask (+inf for a token, -inf for padding, so padding takes no part). They are
    routed to n_parts capsules of shape 1 x d_cap, then to n_classes capsules of shape 1 x d_cap.
    """

    def __init__(self, d_depth, d_emb, d_inp=64, d_cap=2, n_parts=64, n_classes=5):
        super().__init__()
        self.d_depth, self.d_emb, self.d_inp, self.d_cap = d_depth, d_emb, d_inp, d_cap
        self.n_parts, self.n_classes = n_parts, n_classes
        self.depth_emb = nn.Parameter(torch.zeros(d_depth, d_emb))              # [d_depth, d_emb]
        self.detect_parts = nn.Sequential(nn.Linear(d_emb, d_inp), nn.SiLU(), nn.LayerNorm(d_inp))
        nn.init.kaiming_normal_(self.detect_parts[0].weight)
        nn.init.zeros_(self.detect_parts[0].bias)
        self.routings = nn.ModuleList([
            Routing(d_cov=1, d_inp=d_inp, d_out=d_cap, n_out=n_parts),             # variable n_inp
            Routing(d_cov=1, d_inp=d_cap, d_out=d_cap, n_inp=n_parts, n_out=n_classes),
        ])

    def forward(self, hidden, mask=None):
        check_hidden(hidden, mask, self.d_depth, self.d_emb)
        if mask is None:
            mask = torch.zeros(hidden.shape[:-2], dtype=torch.bool, device=hidden.device)
        mask = over_depths(mask, self.d_depth)                                  # [..., n_pos * d_depth]
        a = torch.full(mask.shape, float('inf'), dtype=hidden.dtype, device=hidden.device)
        a = a.masked_fill(mask, float('-inf'))                                   # logit(1 - mask)
        mu = self.detect_parts(hidden + self.depth_emb)                          # [..., n_pos, d_depth, d_inp]
        mu = mu.flatten(-3, -2)[..., None, :]                                    # [..., n_pos * d_depth, 1, d_inp]
        a, mu, sig2 = self.routings[0](a, mu, mask=mask[..., None])  # padding: score -inf, and masked (its values,
        a, mu, sig2 = self.routings[1](a, mu)                       # NaN included, never reach a sum)
        return a, mu, sig2                               # [..., n_classes], [..., n_classes, 1, d_cap] x 2
