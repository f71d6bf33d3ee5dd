"""Next-token cross-entropy from hidden states and the unembedding, one vocabulary chunk at a time.

The reference implementation in plain JAX. It never holds the [T, V] logits: a scan
walks the vocabulary in chunks of C columns keeping an online log-sum-exp (running max
and sum of exponentials, as flash attention does) and the target's logit. The scan body
is rematerialised, so the backward pass recomputes each [T, C] block of logits instead
of storing it: peak memory is O(T x C), not O(T x V).

Shapes in names: T tokens, D width, V vocabulary, C chunk, N = ceil(V / C) chunks.
"""

import jax
import jax.numpy as jnp


def chunked_cross_entropy(
    h_TxD: jax.Array,
    w_DxV: jax.Array,
    targets_T: jax.Array,
    *,
    chunk: int = 8192,
) -> jax.Array:
  """Per-token -log softmax(h @ w)[target] in float32, shape [T].

  Args:
    h_TxD: hidden states, any float dtype; the matmul runs in this dtype.
    w_DxV: unembedding; cast to h's dtype.
    targets_T: int token ids in [0, V).
    chunk: vocabulary columns per block; the last block is padded and masked.
  """
  T, D = h_TxD.shape
  V = w_DxV.shape[1]
  C = min(chunk, V)
  N = -(-V // C)
  w_DxV = w_DxV.astype(h_TxD.dtype)
  w_NxDxC = jnp.pad(w_DxV, ((0, 0), (0, N * C - V))).reshape(D, N, C).transpose(1, 0, 2)

  @jax.checkpoint
  def step(carry, chunk_inputs):
    max_T, sumexp_T, target_logit_T = carry
    w_DxC, start = chunk_inputs
    columns_C = start + jnp.arange(C)
    logits_TxC = jnp.dot(h_TxD, w_DxC, preferred_element_type=jnp.float32)
    logits_TxC = jnp.where(columns_C < V, logits_TxC, -jnp.inf)
    new_max_T = jnp.maximum(max_T, logits_TxC.max(axis=-1))
    sumexp_T = sumexp_T * jnp.exp(max_T - new_max_T) + jnp.exp(logits_TxC - new_max_T[:, None]).sum(-1)
    is_target_TxC = columns_C == targets_T[:, None]
    target_logit_T += jnp.where(is_target_TxC, logits_TxC, 0.0).sum(-1)
    return (new_max_T, sumexp_T, target_logit_T), None

  # A finite start for the running max keeps exp(max - new_max) free of inf - inf.
  init = (jnp.full((T,), -1e30, jnp.float32), jnp.zeros((T,), jnp.float32), jnp.zeros((T,), jnp.float32))
  (max_T, sumexp_T, target_logit_T), _ = jax.lax.scan(step, init, (w_NxDxC, jnp.arange(N) * C))
  return max_T + jnp.log(sumexp_T) - target_logit_T
