"""The Pallas loss kernels (interpret mode on CPU) against the chunked plain-JAX reference.

Tolerances: float32 inputs agree to 2e-5 relative (only the order of the sums differs);
bfloat16 inputs to 2e-2 (bf16 products, float32 accumulation in both, in other orders).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kernels import fused, losses, token_losses, tpu, weighted_loss
from trainer import sharding

# T and V are not multiples of the blocks below, so every last block overhangs.
T, D, E, V = 50, 24, 16, 300
BLOCKS = dict(block_t=16, block_v=128)


def inputs(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 5)
  h_s = jax.random.normal(k[0], (T, D), dtype)
  w_s = (jax.random.normal(k[1], (D, V)) * 0.5).astype(dtype)
  h_t = jax.random.normal(k[2], (T, E), dtype)
  w_t = (jax.random.normal(k[3], (E, V)) * 0.5).astype(dtype)
  targets = jax.random.randint(k[4], (T,), 0, V)
  mask = (jnp.arange(T) % 7 != 3).astype(jnp.float32)  # some tokens masked out
  return h_s, w_s, targets, (h_t, w_t), mask


def mixed_loss(impl, teacher, tau, w, mask, **kw):
  """sum of (1 - w) CE + w KD over the tokens: what a train step differentiates."""

  def loss(h_s, w_s, targets):
    terms = token_losses(h_s, w_s, targets, teacher, mask_T=mask, tau=tau, impl=impl, chunk=128, **kw)
    kd = 0.0 if terms.kd is None else terms.kd
    return ((1 - w) * terms.ce + w * kd).sum(), terms

  return loss


@pytest.mark.parametrize('with_teacher, tau, w', [
    (False, 1.0, 0.0), (True, 1.0, 0.5), (True, 2.0, 0.5), (True, 0.5, 1.0), (True, 1.0, 0.0)])
def test_values_and_gradients_equal_the_reference(with_teacher, tau, w):
  h_s, w_s, targets, teacher, mask = inputs()
  teacher = teacher if with_teacher else None
  grad = jax.value_and_grad
  (got, got_terms), got_grads = grad(mixed_loss('pallas', teacher, tau, w, mask, **BLOCKS), (0, 1), has_aux=True)(
      h_s, w_s, targets)
  (want, want_terms), want_grads = grad(mixed_loss('xla', teacher, tau, w, mask), (0, 1), has_aux=True)(
      h_s, w_s, targets)
  np.testing.assert_allclose(got, want, rtol=2e-5)
  for name in want_terms._fields:
    if getattr(want_terms, name) is not None:
      np.testing.assert_allclose(getattr(got_terms, name), getattr(want_terms, name), rtol=2e-5, atol=2e-5)
  assert float(jnp.abs(got_terms.ce * (1 - mask)).max()) == 0.0
  for g, r in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-6)


def test_bfloat16_inputs_equal_the_reference_within_bf16_tolerance():
  h_s, w_s, targets, teacher, mask = inputs(jnp.bfloat16)
  loss = lambda impl, **kw: jax.value_and_grad(mixed_loss(impl, teacher, 2.0, 0.5, mask, **kw), (0, 1),
                                               has_aux=True)(h_s, w_s, targets)
  (got, _), got_grads = loss('pallas', **BLOCKS)
  (want, _), want_grads = loss('xla')
  np.testing.assert_allclose(got, want, rtol=2e-2)
  for g, r in zip(got_grads, want_grads):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(jnp.float32), r.astype(jnp.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('with_teacher', [False, True])
def test_vocabulary_split_over_tensor_and_tokens_over_data_fsdp(with_teacher):
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  h_s, w_s, targets, teacher, mask = inputs()
  h_s, targets, mask = h_s[:48], targets[:48], mask[:48]  # tokens divide over 4 shards
  teacher = (teacher[0][:48], teacher[1]) if with_teacher else None
  put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
  sharded = mixed_loss('pallas', teacher, 2.0, 0.5, mask, block_t=8, block_v=64, mesh=mesh,
                       token_axes=('data', 'fsdp'), vocab_axes=('tensor',))
  (got, got_terms), got_grads = jax.jit(jax.value_and_grad(sharded, (0, 1), has_aux=True))(
      put(h_s, ('data', 'fsdp'), None), put(w_s, 'fsdp', 'tensor'), targets)
  (want, want_terms), want_grads = jax.value_and_grad(mixed_loss('xla', teacher, 2.0, 0.5, mask), (0, 1),
                                                      has_aux=True)(h_s, w_s, targets)
  np.testing.assert_allclose(got, want, rtol=2e-5)
  for name in want_terms._fields:
    if getattr(want_terms, name) is not None:
      np.testing.assert_allclose(getattr(got_terms, name), getattr(want_terms, name), rtol=2e-5, atol=2e-5)
  for g, r in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-6)


def test_auto_falls_back_to_the_reference_for_teacher_top_k_and_says_so(caplog):
  h_s, w_s, targets, teacher, mask = inputs()
  losses._log_fallback.cache_clear()
  with caplog.at_level(logging.INFO, logger='salt'):
    assert losses.choose('auto', 'gpu', teacher_top_k=5) == 'xla'
  assert 'token_chunks does not truncate the teacher (salt.teacher_top_k > 0)' in caplog.text
  assert losses.choose('auto', 'gpu') == 'token_chunks'
  with pytest.raises(ValueError, match='pallas does not truncate the teacher'):
    weighted_loss(h_s, w_s, targets, teacher, mask, mask, teacher_top_k=5, impl='pallas')
  with pytest.raises(ValueError, match='the Pallas loss kernels run on tpu'):
    losses.choose('pallas', 'gpu')


@pytest.mark.parametrize('device_kind, limit_mib', [('TPU v4', 16), ('TPU v5 lite', 96), ('TPU v5', 48),
                                                    ('TPU v6 lite', 96)])
@pytest.mark.parametrize('widths', [(1024,), (2048, 1024), (2560, 2048), (4096, 2048), (8192, 4096)])
def test_the_block_is_the_largest_that_fits_each_generations_vmem(device_kind, limit_mib, widths):
  limit = tpu.vmem_limit(device_kind)
  assert limit == limit_mib * tpu.MiB
  block = fused.fitting_block(widths, 2, limit)
  assert block is not None and fused.vmem_bytes(*block, widths, 2) <= limit
  assert all(fused.vmem_bytes(*larger, widths, 2) > limit for larger in fused.BLOCKS[:fused.BLOCKS.index(block)])


def test_widths_no_block_fits_are_refused_with_the_numbers():
  reason = losses.unsupported('pallas', 'tpu', device_kind='TPU v4', widths=(8192, 8192), itemsize=2)
  assert reason == ('the Pallas loss kernels need 17 MiB of VMEM at widths (8192, 8192) even at their smallest '
                    'block, more than the 16 MiB of a TPU v4 core')
  assert losses.unsupported('pallas', 'tpu', device_kind='TPU v5', widths=(8192, 8192), itemsize=2) is None


@pytest.mark.parametrize('with_teacher', [False, True])
def test_kernels_lower_for_mosaic_tpu(with_teacher):
  """The TPU lowering runs here without a TPU (jax.export); Mosaic compiles it on the device."""
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
  t, d, e, v = 512, 256, 128, 1000
  teacher = (shape(t, e), shape(e, v)) if with_teacher else None
  kw = dict(tau=2.0, block_t=256, block_v=512, backend='tpu')

  def forward_and_backward(h_s, w_s, targets, teacher, coef):
    return (fused.partial_stats(h_s, w_s, targets, teacher, **kw),
            fused.gradients(h_s, w_s, targets, teacher, coef, **kw))

  exported = jax.export.export(jax.jit(forward_and_backward), platforms=['tpu'])(
      shape(t, d), shape(d, v), shape(t, dtype=jnp.int32), teacher, shape(t, 5, dtype=jnp.float32))
  assert exported.mlir_module().count('tpu_custom_call') == 3
