"""An independent float64 reference of the projector's attention for the attention tests."""

import numpy as np


def float64_attention(q, k, v, g):
  """Independent float64 softmax(q k^T) v per head and its VJP for cotangent g: out, dq, dk, dv."""
  q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
  logits = np.einsum("htd,hrd->htr", q, k)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("htr,hrd->htd", weights, v)
  d_weights = np.einsum("htd,hrd->htr", g, v)
  d_logits = weights * (d_weights - np.sum(d_weights * weights, -1, keepdims=True))
  return (out, np.einsum("htr,hrd->htd", d_logits, k), np.einsum("htr,htd->hrd", d_logits, q),
          np.einsum("htr,htd->hrd", weights, g))
