"""The chunked loss terms equal direct computations on the full logits: values and gradients,
with and without a teacher, for every option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import ce_and_rank, token_losses


def full_logits_losses(h_s, w_s, targets, teacher=None, tau=1.0, top_k=0):
  """The same terms from the whole [T, V] logits: what the chunked scan must reproduce."""
  z = jnp.dot(h_s, w_s.astype(h_s.dtype), preferred_element_type=jnp.float32)
  ce = jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, targets[:, None], -1)[:, 0]
  if teacher is None:
    return ce, None
  h_t, w_t = teacher
  u = jnp.dot(h_t, w_t.astype(h_t.dtype), preferred_element_type=jnp.float32)
  if top_k:
    u = jnp.where(u >= jax.lax.top_k(u, top_k)[0][:, -1:], u, -jnp.inf)
  p_t = jax.nn.softmax(u / tau, -1)
  kd = -(p_t * jax.nn.log_softmax(z / tau, -1)).sum(-1)
  return ce, kd


def inputs(T, D, V, dtype=jnp.float32, seed=0, E=None):
  ks = jax.random.split(jax.random.key(seed), 5)
  h = jax.random.normal(ks[0], (T, D), dtype)
  w = jax.random.normal(ks[1], (D, V), jnp.float32) * 0.5
  targets = jax.random.randint(ks[2], (T,), 0, V)
  E = E or D
  teacher = (jax.random.normal(ks[3], (T, E), dtype), jax.random.normal(ks[4], (E, V), jnp.float32) * 0.5)
  return h, w, targets, teacher


# V = 1000 with chunk 384: the last chunk holds 232 real columns and 152 of padding.
@pytest.mark.parametrize('T, D, V, chunk', [(37, 16, 1000, 384), (64, 32, 512, 512), (8, 8, 50, 7)])
def test_cross_entropy_matches_the_full_logits(T, D, V, chunk):
  h, w, t, _ = inputs(T, D, V)
  np.testing.assert_allclose(token_losses(h, w, t, chunk=chunk).ce, full_logits_losses(h, w, t)[0],
                             rtol=1e-5, atol=1e-5)
  mask = (jnp.arange(T) % 3 != 0).astype(jnp.float32)  # padding tokens get no gradient

  def mean(f):
    return lambda h, w: (f(h, w) * mask).sum() / mask.sum()

  grads = jax.grad(mean(lambda h, w: token_losses(h, w, t, chunk=chunk).ce), (0, 1))(h, w)
  expected = jax.grad(mean(lambda h, w: full_logits_losses(h, w, t)[0]), (0, 1))(h, w)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('tau, top_k', [(1.0, 0), (2.0, 0), (0.5, 0), (1.0, 5), (2.0, 3)])
def test_distillation_terms_match_the_full_logits(tau, top_k):
  h, w, t, teacher = inputs(29, 16, 300, E=8)
  got = token_losses(h, w, t, teacher, tau=tau, teacher_top_k=top_k, chunk=128)
  ce, kd = full_logits_losses(h, w, t, teacher, tau, top_k)
  np.testing.assert_allclose(got.ce, ce, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.kd, kd, rtol=1e-5, atol=1e-5)
  z = h @ w
  u = teacher[0] @ teacher[1]
  np.testing.assert_allclose(got.teacher_ce, full_logits_losses(*teacher, t)[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got.agree, (z.argmax(-1) == u.argmax(-1)).astype(np.float32))

  grad = jax.grad(lambda h: token_losses(h, w, t, teacher, tau=tau, teacher_top_k=top_k, chunk=128).kd.sum())(h)
  want = jax.grad(lambda h: full_logits_losses(h, w, t, teacher, tau, top_k)[1].sum())(h)
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)


def test_kd_by_hand_on_a_three_token_vocabulary():
  # Student logits z = (0, ln 2, 0), teacher logits u = (ln 3, 0, 0), tau = 1:
  # p_t = (3/5, 1/5, 1/5), log p_s = (ln 1/4, ln 2/4, ln 1/4), so
  # kd = -(3/5 ln 1/4 + 1/5 ln 1/2 + 1/5 ln 1/4) = (4/5) ln 4 + (1/5) ln 2.
  h_s = jnp.array([[0.0, np.log(2), 0.0]])
  h_t = jnp.array([[np.log(3), 0.0, 0.0]])
  eye = jnp.eye(3)
  got = token_losses(h_s, eye, jnp.array([1]), (h_t, eye), chunk=2)
  np.testing.assert_allclose(got.kd, [0.8 * np.log(4) + 0.2 * np.log(2)], rtol=1e-6)
  np.testing.assert_allclose(got.ce, [np.log(2)], rtol=1e-6)  # -log(2/4)
  np.testing.assert_allclose(got.teacher_ce, [np.log(5)], rtol=1e-6)  # -log(1/5)
  # Top-1 truncation keeps the teacher's first token only: kd = -log p_s(0) = ln 4.
  np.testing.assert_allclose(token_losses(h_s, eye, jnp.array([1]), (h_t, eye), teacher_top_k=1).kd,
                             [np.log(4)], rtol=1e-6)


@pytest.mark.parametrize('w', [0.0, 0.5, 1.0])
def test_gradient_wrt_student_logits_is_p_s_minus_mixed_target(w):
  # With an identity unembedding the hidden states are the logits, so the gradient of
  # (1 - w) ce + w kd at tau = 1 is p_s - (1 - w) onehot(y) - w p_t.
  V = 11
  z = jax.random.normal(jax.random.key(1), (5, V))
  u = jax.random.normal(jax.random.key(2), (5, V))
  y = jnp.array([0, 3, 10, 7, 3])
  eye = jnp.eye(V)

  def loss(z):
    terms = token_losses(z, eye, y, (u, eye), chunk=4)
    return ((1 - w) * terms.ce + w * terms.kd).sum()

  want = jax.nn.softmax(z) - (1 - w) * jax.nn.one_hot(y, V) - w * jax.nn.softmax(u)
  np.testing.assert_allclose(jax.grad(loss)(z), want, rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_match_the_full_logits():
  # Both round the same bf16 matmul inputs and accumulate in float32; the chunked
  # sums run in another order, so allow float32-level noise.
  h, w, t, teacher = inputs(64, 64, 3000, jnp.bfloat16)
  got = token_losses(h, w, t, teacher, tau=2.0, chunk=1024)
  ce, kd = full_logits_losses(h, w, t, teacher, 2.0)
  np.testing.assert_allclose(got.ce, ce, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got.kd, kd, rtol=1e-4, atol=1e-4)


def test_never_materialises_the_full_logits():
  # The compiled forward and backward keep temporaries far below one [T, V] float32 array.
  T, D, V = 2048, 64, 32768
  h, w, t, teacher = inputs(T, D, V)
  loss = lambda h, w: token_losses(h, w, t, teacher, chunk=1024).kd.sum()
  compiled = jax.jit(jax.grad(loss, (0, 1))).lower(h, w).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < T * V * 4 / 4


def test_ce_and_rank_match_the_full_logits():
  h, w, t, _ = inputs(50, 8, 200)
  z = np.asarray(h @ w)
  target = z[np.arange(50), t]
  ce, rank = ce_and_rank(h, w, t, chunk=64)  # 200 columns: the last chunk is padded
  np.testing.assert_allclose(ce, full_logits_losses(h, w, t)[0], rtol=1e-5)
  np.testing.assert_array_equal(rank, (z > target[:, None]).sum(-1))
  in_top_10 = target >= np.sort(z, -1)[:, -10]
  np.testing.assert_array_equal(rank < 10, in_top_10)
  assert 0 < in_top_10.sum() < 50  # both outcomes occur
