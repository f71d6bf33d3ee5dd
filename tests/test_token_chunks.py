"""The GPU-shaped loss (tokens in chunks, gradients in the forward pass) against the reference.

T = 50 and V = 300 are multiples of no chunk used here, so the last chunk of tokens
is padded. Tolerances: float32 agrees to 2e-5 (sums in other orders); bfloat16 to
3e-2 (bf16 logits and dz, where the reference keeps float32 logits).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kernels import token_chunks, weighted_loss
from tests.helpers import tiny_config
from trainer import sharding, train
from trainer.errors import UserError

T, D, E, V = 50, 24, 16, 300


def inputs(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 5)
  h_s = jax.random.normal(k[0], (T, D), dtype)
  w_s = (jax.random.normal(k[1], (D, V)) * 0.5).astype(dtype)
  teacher = (jax.random.normal(k[2], (T, E), dtype), (jax.random.normal(k[3], (E, V)) * 0.5).astype(dtype))
  targets = jax.random.randint(k[4], (T,), 0, V)
  mask = (jnp.arange(T) % 7 != 3).astype(jnp.float32)  # some tokens weigh nothing
  return h_s, w_s, targets, teacher, mask


def loss_and_grads(impl, h_s, w_s, targets, teacher, g_ce, g_kd, **kw):
  loss = lambda h, w: weighted_loss(h, w, targets, teacher, g_ce, g_kd, impl=impl, chunk=128, **kw)
  return jax.value_and_grad(loss, (0, 1), has_aux=True)(h_s, w_s)


def assert_equal(got, want, tol):
  (loss, terms), grads = got
  (want_loss, want_terms), want_grads = want
  np.testing.assert_allclose(loss, want_loss, rtol=tol)
  for name in want_terms._fields:
    if getattr(want_terms, name) is not None:
      np.testing.assert_allclose(getattr(terms, name), getattr(want_terms, name), rtol=tol, atol=tol)
  for g, r in zip(grads, want_grads):
    assert g.dtype == r.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=tol, atol=tol / 10)


@pytest.mark.parametrize('with_teacher, tau, w, chunk', [
    (False, 1.0, 0.0, 16), (True, 1.0, 0.5, 16), (True, 2.0, 0.5, 32), (True, 0.5, 1.0, 16), (True, 2.0, 0.0, 64)])
def test_values_and_gradients_equal_the_reference(with_teacher, tau, w, chunk):
  h_s, w_s, targets, teacher, mask = inputs()
  teacher = teacher if with_teacher else None
  g_ce, g_kd = (1 - w) * mask / mask.sum(), w * mask / mask.sum()
  assert_equal(loss_and_grads('token_chunks', h_s, w_s, targets, teacher, g_ce, g_kd, tau=tau, chunk_tokens=chunk),
               loss_and_grads('xla', h_s, w_s, targets, teacher, g_ce, g_kd, tau=tau), 2e-5)


def test_bfloat16_inputs_equal_the_reference_within_bf16_tolerance():
  h_s, w_s, targets, teacher, mask = inputs(jnp.bfloat16)
  g = 0.5 * mask / mask.sum()
  assert_equal(loss_and_grads('token_chunks', h_s, w_s, targets, teacher, g, g, tau=2.0, chunk_tokens=16),
               loss_and_grads('xla', h_s, w_s, targets, teacher, g, g, tau=2.0), 3e-2)


@pytest.mark.parametrize('with_teacher', [False, True])
def test_vocabulary_split_over_tensor_and_tokens_over_data_fsdp(with_teacher):
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  h_s, w_s, targets, teacher, mask = inputs()
  h_s, targets, mask = h_s[:48], targets[:48], mask[:48]  # 12 tokens per shard: a chunk of 8 and a padded one
  teacher = (teacher[0][:48], teacher[1]) if with_teacher else None
  g_ce, g_kd = 0.5 * mask / mask.sum(), 0.5 * mask / mask.sum()
  put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
  sharded = jax.jit(lambda h, w, t, g_ce, g_kd: loss_and_grads(
      'token_chunks', h, w, t, teacher, g_ce, g_kd, tau=2.0, chunk_tokens=8, mesh=mesh,
      token_axes=('data', 'fsdp'), vocab_axes=('tensor',)))
  tokens = ('data', 'fsdp')
  got = sharded(put(h_s, tokens, None), put(w_s, 'fsdp', 'tensor'), put(targets, tokens), put(g_ce, tokens),
                put(g_kd, tokens))
  assert_equal(got, loss_and_grads('xla', h_s, w_s, targets, teacher, g_ce, g_kd, tau=2.0), 2e-5)


def test_the_forward_pass_computes_the_gradients_and_the_backward_only_scales_them():
  """The gradient's program holds the chunk scan once: logits are never recomputed."""
  h_s, w_s, targets, teacher, mask = inputs()
  g = 0.5 * mask

  def grads(impl):
    return jax.make_jaxpr(jax.grad(lambda h, w: weighted_loss(h, w, targets, teacher, g, g, impl=impl,
                                                              chunk=128, chunk_tokens=16)[0], (0, 1)))(h_s, w_s)

  assert str(grads('token_chunks')).count('scan[') == 1
  assert str(grads('xla')).count('scan[') == 2  # the reference scans forward, then again backward


def test_without_gradients_only_the_statistics_are_computed():
  h_s, w_s, targets, teacher, mask = inputs()
  program = str(jax.make_jaxpr(lambda h, w: weighted_loss(h, w, targets, teacher, mask, mask, impl='token_chunks',
                                                          chunk_tokens=16))(h_s, w_s))
  assert program.count('dot_general') == 2  # the two models' logits; no dz W^T, no h^T dz


def test_compiled_temporaries_stay_within_the_chunk_budget():
  """At 4096 tokens x 8192 columns, 128-token chunks: the temporaries stay under a
  quarter of one [T, V] float32 array (what the logits of one model alone would take)."""
  T, Ds, Dt, V = 4096, 64, 32, 8192
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
  half = jnp.full((T,), 0.5)
  step = jax.jit(jax.value_and_grad(lambda h, w, t, h_t, w_t: weighted_loss(
      h, w, t, (h_t, w_t), half, half, impl='token_chunks', chunk_tokens=128)[0], (0, 1)))
  memory = step.lower(shape(T, Ds), shape(Ds, V), shape(T, dtype=jnp.int32), shape(T, Dt),
                      shape(Dt, V)).compile().memory_analysis()
  assert memory.temp_size_in_bytes < T * V * 4 / 4


@pytest.mark.parametrize('vocab, itemsize, teacher, chunk', [
    (32768, 2, True, 4096), (131072, 2, True, 1024), (262144, 2, True, 512), (131072, 2, False, 2048),
    (131072, 4, True, 512), (1000, 2, True, 8192)])
def test_the_default_chunk_keeps_both_models_logits_and_dz_within_the_budget(vocab, itemsize, teacher, chunk):
  assert token_chunks.default_chunk(vocab, itemsize, teacher) == chunk
  arrays = 3 if teacher else 2
  assert chunk * vocab * itemsize * arrays <= token_chunks.CHUNK_BUDGET_BYTES or chunk == 256


def test_a_loss_named_that_cannot_run_is_a_user_error_at_start_up():
  config = tiny_config()
  config.loss.impl = 'token_chunks'
  config.salt.teacher_top_k = 5
  with pytest.raises(UserError, match="loss.impl='token_chunks': token_chunks does not truncate the teacher"):
    train.build(config, train.make_mesh(config), np.ones(320, np.int32))
