"""The chunked cross-entropy equals the naive one that builds all logits, value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import chunked_cross_entropy


def naive_cross_entropy(h_TxD, w_DxV, targets_T):
  logits = jnp.dot(h_TxD, w_DxV.astype(h_TxD.dtype), preferred_element_type=jnp.float32)
  return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets_T[:, None], -1)[:, 0]


def inputs(T, D, V, dtype, seed=0):
  kh, kw, kt = jax.random.split(jax.random.key(seed), 3)
  h = jax.random.normal(kh, (T, D), dtype)
  w = jax.random.normal(kw, (D, V), jnp.float32) * 0.5
  return h, w, jax.random.randint(kt, (T,), 0, V)


# V = 1000 with chunk 384: the last chunk holds 232 real columns and 152 of padding.
@pytest.mark.parametrize('T, D, V, chunk', [(37, 16, 1000, 384), (64, 32, 512, 512), (8, 8, 50, 7)])
def test_matches_naive_in_float32(T, D, V, chunk):
  h, w, t = inputs(T, D, V, jnp.float32)
  chunked = chunked_cross_entropy(h, w, t, chunk=chunk)
  np.testing.assert_allclose(chunked, naive_cross_entropy(h, w, t), rtol=1e-5, atol=1e-5)

  mask = (jnp.arange(T) % 3 != 0).astype(jnp.float32)  # padding tokens get no gradient

  def mean_loss(f):
    return lambda h, w: (f(h, w, t) * mask).sum() / mask.sum()

  grads = jax.grad(mean_loss(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk=chunk)), (0, 1))(h, w)
  expected = jax.grad(mean_loss(naive_cross_entropy), (0, 1))(h, w)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_matches_naive_in_bfloat16():
  # Both round the same bf16 matmul inputs and accumulate in float32; the chunked
  # sum of exponentials runs in a different order, so allow float32-level noise.
  h, w, t = inputs(64, 64, 3000, jnp.bfloat16)
  np.testing.assert_allclose(chunked_cross_entropy(h, w, t, chunk=1024), naive_cross_entropy(h, w, t),
                             rtol=1e-4, atol=1e-4)


def test_never_materialises_the_full_logits():
  # The compiled program's temporaries stay far below one [T, V] float32 array.
  T, D, V = 2048, 64, 32768
  h, w, t = inputs(T, D, V, jnp.float32)
  loss = lambda h, w: chunked_cross_entropy(h, w, t, chunk=1024).sum()
  compiled = jax.jit(jax.grad(loss, (0, 1))).lower(h, w).compile()
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  assert temp_bytes < T * V * 4 / 4, temp_bytes
