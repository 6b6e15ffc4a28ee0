"""An independent PyTorch definition of the reference projector (docs/method.md section 3), for
tests.

Written from docs/method.md, in the reference's layout (channels-first, per-image loop over the
reference tokens as the reference does), so that exported weights can be loaded with
`load_state_dict(strict=True)` and the outputs compared with adjax's.
"""

import math

import torch
from torch import nn
import torch.nn.functional as F


def _se_dim(channels: int) -> int:
  return max(8, int(channels / 16 + 4) // 8 * 8)


class SqueezeExcite(nn.Module):

  def __init__(self, channels: int):
    super().__init__()
    self.fc1 = nn.Linear(channels, _se_dim(channels))
    self.fc2 = nn.Linear(_se_dim(channels), channels)

  def forward(self, h):  # (B, L, C)
    s = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean(dim=1, keepdim=True)))))
    return h * s


class Mlp(nn.Module):

  def __init__(self, dim: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, 4 * dim)
    self.se = SqueezeExcite(4 * dim)
    self.fc2 = nn.Linear(4 * dim, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.se(self.fc1(x))))


class Layer(nn.Module):

  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
    self.mlp = Mlp(dim)

  def forward(self, x, ref):
    a, _ = self.cross_attn(x, ref, ref, need_weights=False)
    x = x - a
    return x + self.mlp(x)


class RefProj(nn.Module):

  def __init__(self, dim: int):
    super().__init__()
    self.project = nn.Conv1d(dim, dim, 1)


class Block(nn.Module):

  def __init__(self, dim: int, heads: int = 16, num_ref: int = 2048, depth: int = 1):
    super().__init__()
    self.x_ref = nn.Parameter(torch.randn(1, num_ref, dim))
    self.ref_proj = RefProj(dim)
    self.layers = nn.ModuleList([Layer(dim, heads) for _ in range(depth)])

  def forward(self, x):  # (B, C, H, W)
    b, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    outs = []
    for i in range(b):  # the reference projects the references again for every image
      ref = self.ref_proj.project(self.x_ref.transpose(1, 2)).transpose(1, 2)
      t = tokens[i:i + 1]
      for layer in self.layers:
        t = layer(t, ref)
      outs.append(t)
    return torch.cat(outs).transpose(1, 2).reshape(b, c, h, w)


class Projector(nn.Module):

  def __init__(self, dims, heads: int = 16, num_ref: int = 2048, depth: int = 1):
    super().__init__()
    for k, dim in enumerate(dims):
      setattr(self, f"l{k + 1}_proj", Block(dim, heads, num_ref, depth))
    self.num_levels = len(dims)

  def forward(self, levels):
    return [getattr(self, f"l{k + 1}_proj")(x) for k, x in enumerate(levels)]


def angle_loss_dense(e1, e2, mask, center=None, temp=0.15):
  """The angle loss as the reference writes it: boolean indexing, dense similarities."""
  if center is not None:
    e1, e2 = e1 - center, e2 - center
  u, v = F.normalize(e1, dim=1), F.normalize(e2, dim=1)
  feats = torch.cat([u, v])
  labels = torch.cat([mask, mask]).bool()
  if labels.all() or (~labels).all():
    return feats.sum() * 0
  pos = (u * v).sum(1) / temp
  pos = torch.cat([pos, pos])
  sims = feats @ feats.T / temp
  neg_mask = labels[:, None] != labels[None, :]
  lse = torch.logsumexp(sims.masked_fill(~neg_mask, -math.inf), dim=1)
  return (-pos + lse).mean()


def norm_loss(e, mask):
  """The norm-oriented loss (docs/method.md section 4) with boolean indexing, as the reference
  writes it."""
  a = torch.sqrt(e.norm(dim=1) + 1) - 1
  labels = mask.bool()
  r_max = (torch.clamp(0.9 * a[labels].min().detach(), max=0.4) if labels.any()
           else torch.tensor(0.4))
  r_min = 0.99 * r_max
  bound = r_max + 0.75

  def term(values, margin):
    if values.numel() == 0:
      return e.sum() * 0
    return (F.softplus(margin) * torch.exp(margin.detach())).mean()

  normal, anomalous = a[~labels], a[labels]
  above, below = normal[normal > r_max], normal[normal < r_min]
  inside = anomalous[anomalous < bound]
  return term(above, above - r_max) + term(below, r_min - below) + term(inside, bound - inside)
