"""
GLOM, Hinton's answer to how a network forms part-whole hierarchies ("How to represent part-whole
hierarchies in a neural network", 2021), as a baseline beside routing, and the two models it is
compared with on the same data (studies/glom_digits.py):

  GLOM                    a grid of columns, one per pixel, each a stack of n_levels level vectors,
                          iterated for n_steps; the top level votes for the class.
  RoutingDigitClassifier  a small conv stem whose positions are routed by this library's
                          EfficientVectorRouting (n_inp=-1) to one capsule per class.
  CNNDigitClassifier      a plain CNN of the same size (two 3x3 convs, global average pool, linear).

All three take images [B, 1, H, W] of any size (8x8 digits, 28x28 MNIST) and return class scores
[B, n_classes] (GLOM also returns its final state). All three see the pixel value and the pixel's
location (y, x in [-1, 1]) at every position, so none gets location information the others lack.

GLOM, top to bottom (shapes: B batch, L levels, D level size, H x W the grid):

    state[:, 0]   the bottom level, [B, D, H, W]: the pixel value and its location, embedded by a
                  shared linear map (a 1x1 conv). It is the sensory input: clamped, never updated.
    state[:, 1:]  levels 1..L-1, [B, L-1, D, H, W], start from one bottom-up sweep (level l =
                  BottomUp_l(level l-1), l = 1..L-1), so the top level depends on the image from
                  the first step on.
    for t in 1..n_steps:
        z      = state  (+ Gaussian noise in training)                      # [B, L, D, H, W]
        bu_l   = BottomUp_l(z_{l-1})       3x3 conv -> GELU -> 1x1 conv      (l = 1..L-1)
        td_l   = TopDown_l(z_{l+1}, y, x)  1x1 conv -> GELU -> 1x1 conv      (l = 1..L-2; 0 at the top)
        att_l  = sum over the 3x3 window of softmax_w(scale_l * cos(z_l, z_l[w])) z_l[w]
                 (the location itself included; islands of agreement)
        state[:, 1:] += (bu + td + att) / n_steps                           # residual across steps
    scores = mean over locations of the top level, state[:, -1]             # [B, D] = [B, n_classes]

The nets of one level transition are shared by all locations (convolutions), and those of all
levels run as one grouped convolution, so a step is a handful of batched tensor ops; there are no
per-pixel or per-level Python loops in a step. The update is a pure residual (an Euler step of
d state / dt = bu + td + att over a unit time): d state_{t+1} / d state_t = I + O(1/n_steps), so
gradients reach the first steps undiminished whatever n_steps is (tests/test_glom.py checks), and
the state stays bounded as n_steps grows.

Loss: cross-entropy on the top level's vote (GLOM.loss with config.loss = 'ce', the default), not
the MSE to the one-hot class of the paper's description (config.loss = 'mse', also supported; the
top level is trained toward the class either way: cross-entropy's optimum is a vote whose largest
entry is the class, MSE's is the one-hot vector itself). Why: (1) in our runs of
studies/glom_digits.py with --glom_loss mse, training stalled on some seeds at the loss of a
uniform vote (every entry 0.1, MSE 0.09) and ended far below the cross-entropy runs of the same
seed, which did not stall; (2) cross-entropy is the loss of the two comparison models, so the
comparison differs in the model only. Reproduce: python -m studies.glom_digits
--models glom --glom_loss mse.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from heinsen_routing import EfficientVectorRouting

__all__ = ['GLOMConfig', 'GLOM', 'RoutingDigitClassifier', 'CNNDigitClassifier', 'neighbour_similarity',
           'check_images']


# -------------------------------------------------------------------------------------------------
# Shared helpers
# -------------------------------------------------------------------------------------------------

def check_images(images, name='images'):
    """images must be a floating-point tensor [B, 1, H, W]. Returns (B, H, W)."""
    if not torch.is_tensor(images) or not images.is_floating_point():
        got = f"dtype {images.dtype}" if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{name} must be a floating-point tensor [B, 1, H, W], got {got}")
    if images.dim() != 4 or images.shape[1] != 1 or 0 in images.shape:
        raise ValueError(f"{name} must have shape [B, 1, H, W] (one channel, B, H, W >= 1), "
                         f"got {tuple(images.shape)}")
    return images.shape[0], images.shape[2], images.shape[3]


def coordinates(h, w, like):
    """The location of every pixel: [2, H, W], channel 0 = y, channel 1 = x, each in [-1, 1]."""
    ys = torch.linspace(-1, 1, h, dtype=like.dtype, device=like.device) if h > 1 else like.new_zeros(1)
    xs = torch.linspace(-1, 1, w, dtype=like.dtype, device=like.device) if w > 1 else like.new_zeros(1)
    return torch.stack(torch.meshgrid(ys, xs, indexing='ij'))                  # [2, H, W]


def with_coordinates(images):
    """[B, 1, H, W] -> [B, 3, H, W]: pixel value, y, x."""
    b, _, h, w = images.shape
    return torch.cat([images, coordinates(h, w, images).expand(b, 2, h, w)], dim=1)


def unit_vectors(x, dim, eps=1e-6):
    """x / sqrt(|x|^2 + eps) along dim: unit vectors (smooth at 0, unlike x / max(|x|, eps))."""
    return x * torch.rsqrt(x.pow(2).sum(dim=dim, keepdim=True) + eps)


def neighbours(x):
    """The 3x3 window around every location: x [N, C, H, W] -> [N, C, 9, H, W] (zeros outside the
    image), and valid [1, 1, 9, H, W] bool, False where the window leaves the image. Window index
    3 * (dy + 1) + (dx + 1) holds the neighbour at offset (dy, dx); index 4 is the location itself.
    (Nine shifted slices of the zero-padded grid: the same as F.unfold(x, 3, padding=1), which is
    orders of magnitude slower on CPU for these small grids.)"""
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))                                            # [N, C, H+2, W+2]
    windows = torch.stack([padded[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)], dim=2)
    ones = F.pad(x.new_ones(1, 1, h, w), (1, 1, 1, 1))
    valid = torch.stack([ones[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)], dim=2) > 0
    return windows, valid                                                      # [N, C, 9, H, W], [1, 1, 9, H, W]


@torch.no_grad()
def neighbour_similarity(state):
    """GLOM's islands: state [B, L, D, H, W] -> [B, L, H, W], the mean cosine similarity of each
    location's level vector to those of its (up to 8) neighbours in the image."""
    b, n_levels, d, h, w = state.shape
    unit = unit_vectors(state.flatten(0, 1), dim=1)                            # [B*L, D, H, W]
    windows, valid = neighbours(unit)                                          # [B*L, D, 9, H, W]
    cos = (unit[:, :, None] * windows).sum(dim=1)                              # [B*L, 9, H, W]
    valid = valid[0].clone()                                                   # [1, 9, H, W]
    valid[:, 4] = False                                                        # not the location itself
    mean = (cos * valid).sum(dim=1) / valid.sum(dim=1)                         # [B*L, H, W]
    return mean.view(b, n_levels, h, w)


# -------------------------------------------------------------------------------------------------
# GLOM
# -------------------------------------------------------------------------------------------------

@dataclass
class GLOMConfig:
    n_levels: int = 4          # L: levels per column, bottom (the pixel) included; >= 2
    d: int = 10                # D: size of every level vector; the top level is the class vote
    n_classes: int = 10        # must equal d: the top-level vectors are trained toward the class
    n_steps: int = 30          # T: iterations of the state
    d_hidden: int = 32         # hidden width of every bottom-up and top-down net
    noise: float = 0.1         # std of the Gaussian noise added to the normalised state in training
    sim_scale: float = 5.0     # initial inverse temperature of the same-level attention (learned)
    loss: str = 'ce'           # 'ce' (cross-entropy on the vote) or 'mse' (MSE to the one-hot class)

    def __post_init__(self):
        for name in ('n_levels', 'd', 'n_classes', 'n_steps', 'd_hidden'):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"GLOMConfig.{name} must be a positive int, got {value!r}")
        if self.n_levels < 2:
            raise ValueError(f"GLOMConfig.n_levels must be >= 2 (bottom and top), got {self.n_levels}")
        if self.d != self.n_classes:
            raise ValueError(f"GLOMConfig.d ({self.d}) must equal n_classes ({self.n_classes}): "
                             f"the top-level vectors are the class vote")
        if self.loss not in ('ce', 'mse'):
            raise ValueError(f"GLOMConfig.loss must be 'ce' or 'mse', got {self.loss!r}")
        if self.noise < 0 or self.sim_scale <= 0:
            raise ValueError(f"GLOMConfig.noise must be >= 0 and sim_scale > 0, got {self.noise}, {self.sim_scale}")


class GLOM(nn.Module):
    """forward(images [B, 1, H, W]) -> (scores [B, n_classes], final state [B, L, D, H, W])."""

    def __init__(self, config=None):
        super().__init__()
        self.config = c = config if config is not None else GLOMConfig()
        L, D, Hd = c.n_levels, c.d, c.d_hidden
        # bottom level: [pixel, y, x] -> D at every location
        self.embed = nn.Conv2d(3, D, kernel_size=1)
        # bottom-up nets, level l-1 -> l for l = 1..L-1, one group each: sees a 3x3 patch of level l-1
        self.bottom_up = nn.Sequential(
            nn.Conv2d((L - 1) * D, (L - 1) * Hd, kernel_size=3, padding=1, groups=L - 1),
            nn.GELU(),
            nn.Conv2d((L - 1) * Hd, (L - 1) * D, kernel_size=1, groups=L - 1))
        # top-down nets, level l+1 (and the location y, x) -> l for l = 1..L-2: a whole predicts its
        # part, which depends on where the part is
        self.top_down = None if L == 2 else nn.Sequential(
            nn.Conv2d((L - 2) * (D + 2), (L - 2) * Hd, kernel_size=1, groups=L - 2),
            nn.GELU(),
            nn.Conv2d((L - 2) * Hd, (L - 2) * D, kernel_size=1, groups=L - 2))
        # inverse temperature of each level's attention to its neighbours
        self.log_sim_scale = nn.Parameter(torch.full((L - 1,), math.log(c.sim_scale)))  # [L-1]
        # nets that keep the scale of their input (PyTorch's default init shrinks it ~3x per net,
        # which leaves the top level, 3 nets above the pixels, nearly the same for every image)
        for net in filter(None, (self.bottom_up, self.top_down)):
            nn.init.kaiming_normal_(net[0].weight, nonlinearity='relu')
            nn.init.normal_(net[2].weight, std=net[2].weight[0].numel() ** -0.5)
            nn.init.zeros_(net[0].bias)
            nn.init.zeros_(net[2].bias)

    def forward(self, images, return_states=False):
        """images [B, 1, H, W] -> scores [B, n_classes], state [B, L, D, H, W]; with return_states,
        also the list of the n_steps states of levels 1..L-1 ([B, L-1, D, H, W] each, after each step)."""
        B, H, W = check_images(images)
        c = self.config
        L, D = c.n_levels, c.d
        coords = coordinates(H, W, images)                                             # [2, H, W]
        bottom = self.embed(with_coordinates(images))                                  # [B, D, H, W]
        upper = bottom.new_zeros(B, L - 1, D, H, W)                                     # [B, L-1, D, H, W]
        for _ in range(L - 1):                       # initial state: one bottom-up sweep, a level per pass
            upper = self.bottom_up_pass(bottom, upper)
        states = []
        for _ in range(c.n_steps):
            upper = upper + self.step(bottom, upper, coords) / c.n_steps                # residual
            states.append(upper)
        state = torch.cat([bottom[:, None], upper], dim=1)                             # [B, L, D, H, W]
        scores = upper[:, -1].mean(dim=(-2, -1))                                        # [B, n_classes]
        return (scores, state, states) if return_states else (scores, state)

    def step(self, bottom, upper, coords):
        """One iteration's contributions to levels 1..L-1: bottom-up + top-down + attention.
        bottom [B, D, H, W], upper [B, L-1, D, H, W], coords [2, H, W] -> [B, L-1, D, H, W]."""
        c = self.config
        B, M, D, H, W = upper.shape                                                    # M = L-1
        z = torch.cat([bottom[:, None], upper], dim=1)                                 # [B, L, D, H, W]
        if self.training and c.noise > 0:
            z = z + c.noise * torch.randn_like(z)
        bu = self.bottom_up_pass(z[:, 0], z[:, 1:])                                    # [B, L-1, D, H, W]
        # top-down: levels 2..L-1 (with the location) predict levels 1..L-2; nothing above the top
        if self.top_down is None:
            td = torch.zeros_like(bu)
        else:
            above = torch.cat([z[:, 2:], coords.expand(B, M - 1, 2, H, W)], dim=2)   # [B, L-2, D+2, H, W]
            td = self.top_down(above.flatten(1, 2)).view(B, M - 1, D, H, W)            # [B, L-2, D, H, W]
            td = F.pad(td, (0, 0, 0, 0, 0, 0, 0, 1))                                   # [B, L-1, D, H, W]
        att = self.attend(z[:, 1:])                                                    # [B, L-1, D, H, W]
        return bu + td + att

    def bottom_up_pass(self, bottom, upper):
        """The bottom-up nets' predictions of levels 1..L-1 from levels 0..L-2, all levels in one
        grouped conv. bottom [B, D, H, W], upper [B, L-1, D, H, W] -> [B, L-1, D, H, W]."""
        B, M, D, H, W = upper.shape
        below = torch.cat([bottom[:, None], upper[:, :-1]], dim=1)                     # [B, L-1, D, H, W]
        return self.bottom_up(below.flatten(1, 2)).view(B, M, D, H, W)

    def attend(self, z):
        """Same-level attention within the 3x3 window (the location itself included): the average
        of the neighbours' vectors, weighted by a softmax of their cosine similarity to this vector
        (islands of agreement). z [B, M, D, H, W] -> [B, M, D, H, W]."""
        B, M, D, H, W = z.shape
        windows, valid = neighbours(z.flatten(0, 1))                                   # [B*M, D, 9, H, W]
        windows = windows.view(B, M, D, 9, H, W)
        unit = unit_vectors(z, dim=2)                                                  # [B, M, D, H, W]
        cos = (unit[:, :, :, None] * unit_vectors(windows, dim=2)).sum(dim=2)          # [B, M, 9, H, W]
        logits = cos * self.log_sim_scale.exp()[:, None, None, None]                   # [B, M, 9, H, W]
        logits = logits.masked_fill(~valid[0], float('-inf'))                          # outside the image
        weights = logits.softmax(dim=2)                                                # [B, M, 9, H, W]
        return (weights[:, :, None] * windows).sum(dim=3)                              # [B, M, D, H, W]

    def loss(self, scores, labels):
        """Cross-entropy on the vote (config.loss 'ce') or MSE of the vote to the one-hot class ('mse')."""
        if self.config.loss == 'ce':
            return F.cross_entropy(scores, labels)
        return F.mse_loss(scores, F.one_hot(labels, scores.shape[-1]).to(scores.dtype))


# -------------------------------------------------------------------------------------------------
# The comparison models
# -------------------------------------------------------------------------------------------------

def conv_stem(d_hidden):
    """[B, 3, H, W] (pixel, y, x) -> [B, d_hidden, H, W]: two 3x3 convs with GELUs, size kept."""
    return nn.Sequential(
        nn.Conv2d(3, d_hidden, kernel_size=3, padding=1), nn.GELU(),
        nn.Conv2d(d_hidden, d_hidden, kernel_size=3, padding=1), nn.GELU())


class RoutingDigitClassifier(nn.Module):
    """A conv stem whose H*W positions are routed to n_classes capsules of size 1 by
    EfficientVectorRouting(n_inp=-1): the capsule is the class score, as in the paper's head.
    forward(images [B, 1, H, W]) -> scores [B, n_classes]."""

    def __init__(self, n_classes=10, d_hidden=32, n_iters=2):
        super().__init__()
        self.stem = conv_stem(d_hidden)
        self.route = EfficientVectorRouting(n_inp=-1, n_out=n_classes, d_inp=d_hidden, d_out=1, n_iters=n_iters)

    def forward(self, images):
        check_images(images)
        x = self.stem(with_coordinates(images))                                        # [B, d, H, W]
        x = x.flatten(2).transpose(1, 2)                                               # [B, H*W, d]
        return self.route(x).squeeze(-1)                                               # [B, n_classes]


class CNNDigitClassifier(nn.Module):
    """The same conv stem, global average pooling, and a linear layer.
    forward(images [B, 1, H, W]) -> scores [B, n_classes]."""

    def __init__(self, n_classes=10, d_hidden=32):
        super().__init__()
        self.stem = conv_stem(d_hidden)
        self.head = nn.Linear(d_hidden, n_classes)

    def forward(self, images):
        check_images(images)
        x = self.stem(with_coordinates(images))                                        # [B, d, H, W]
        return self.head(x.mean(dim=(-2, -1)))                                         # [B, n_classes]
