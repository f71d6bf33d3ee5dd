"""Attention inside the documents of packed rows: every implementation against the XLA
reference and, in sliding windows, against attention written out in float64 NumPy.

On CPU the Pallas kernels (pallas_gpu, splash) run in interpret mode; cudnn needs a
GPU, so only its choice is tested here. Tolerances: float32 agrees to 2e-5 (the
kernels sum in blocks, the reference at once); bfloat16 to 3e-2 (bf16 rounding of
the scores and weights, in other orders).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.interpreters import partial_eval as pe  # dead-code elimination of a jaxpr
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kernels import attention
from tests.helpers import tiny_config
from trainer import dryrun, sharding, train
from trainer.errors import UserError
from trainer.model import REMAT_POLICIES
from trainer.model import ModelConfig, Transformer

B, L, H, K, E = 4, 256, 4, 2, 32
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def packed_rows():
  """Documents of uneven lengths, none aligned to a kernel block; the last row is one
  document followed by padding (segment 0)."""
  lengths = [[70, 60, 100, 26], [1, 200, 55], [256], [129, 100]]
  rows = [np.repeat(np.arange(1, len(ls) + 1), ls) for ls in lengths]
  rows[-1] = np.concatenate([rows[-1], np.zeros(L - 229, int)])
  return jnp.asarray(np.stack(rows), jnp.int32)


def qkv(dtype):
  k = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(k[0], (B, L, H, E), dtype), jax.random.normal(k[1], (B, L, K, E), dtype),
          jax.random.normal(k[2], (B, L, K, E), dtype))


def mesh_222():
  return sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('impl', ['pallas_gpu', 'splash'])
def test_kernel_equals_the_reference_on_packed_rows_sharded_over_2_2_2(impl, dtype):
  mesh = mesh_222()
  segments = packed_rows()
  q, k, v = jax.device_put(qkv(dtype), NamedSharding(mesh, P(('data', 'fsdp'), None, 'tensor', None)))
  kernel = attention.make_attention(impl, mesh=mesh, batch_axes=('data', 'fsdp'), head_axes=('tensor',),
                                    kv_head_axes=('tensor',))
  cotangent = jax.random.normal(jax.random.key(1), (B, L, H, E), dtype)

  def forward_and_backward(f):
    out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, segments), q, k, v)
    return (out, *vjp(cotangent))

  tol = TOLERANCE[dtype]
  for got, want in zip(jax.jit(lambda *a: forward_and_backward(kernel))(q, k, v),
                       forward_and_backward(attention.reference)):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


def test_the_reference_keeps_documents_apart():
  # Query 100 of row 0 (document 2, which starts at 70) against the same query with
  # every other document's keys and values replaced: the output must not change.
  q, k, v = qkv(jnp.float32)
  segments = packed_rows()
  others = segments[0] != 2
  noise = jax.random.normal(jax.random.key(3), k.shape)
  k2, v2 = (jnp.where(others[None, :, None, None], noise[:, :, :K], x) for x in (k, v))
  np.testing.assert_array_equal(attention.reference(q, k, v, segments)[0, 70:130],
                                attention.reference(q, k2, v2, segments)[0, 70:130])


def explicit_mask(segments, window: int) -> np.ndarray:
  """[B, L, L]: Hugging Face's sliding window from positions, not as the module builds it."""
  segments = np.asarray(segments)
  i, j = np.arange(L)[:, None], np.arange(L)[None, :]
  in_window = (i - j < window) if window else True
  return (segments[:, :, None] == segments[:, None, :]) & (j <= i) & in_window


def explicit_attention(q, k, v, segments, window: int, cotangent):
  """Output and gradients of q, k, v, in float64 NumPy, the backward written out."""
  q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, cotangent))
  k, v = (np.repeat(x, H // K, axis=2) for x in (k, v))
  scores = np.einsum('bqhe,bkhe->bhqk', q, k) * E ** -0.5
  scores = np.where(explicit_mask(segments, window)[:, None], scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum('bhqk,bkhe->bqhe', p, v)
  d_p = np.einsum('bqhe,bkhe->bhqk', d_out, v)
  d_scores = p * (d_p - (d_p * p).sum(-1, keepdims=True)) * E ** -0.5
  dq = np.einsum('bhqk,bkhe->bqhe', d_scores, k)
  dk, dv = np.einsum('bhqk,bqhe->bkhe', d_scores, q), np.einsum('bhqk,bqhe->bkhe', p, d_out)
  per_kv_head = lambda x: x.reshape(B, L, K, H // K, E).sum(3)  # the query heads that share it
  return out, dq, per_kv_head(dk), per_kv_head(dv)


def assert_equals_explicit(kernel, window: int, sharding=None):
  segments = packed_rows()
  q, k, v = jax.device_put(qkv(jnp.float32), sharding)
  cotangent = jax.random.normal(jax.random.key(1), (B, L, H, E))

  @jax.jit
  def forward_and_backward(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, segments, window=window), q, k, v)
    return (out, *vjp(cotangent))

  for got, want in zip(forward_and_backward(q, k, v), explicit_attention(q, k, v, segments, window, cotangent)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('window', [0, 1, 3, 100, L + 50])
def test_the_window_mask_is_hugging_faces(window):
  np.testing.assert_array_equal(attention.document_mask(packed_rows(), window)[:, 0],
                                explicit_mask(packed_rows(), window))


@pytest.mark.parametrize('impl, window', [('xla', 0), ('xla', 1), ('xla', 3), ('xla', L + 50),
                                          ('splash', 0), ('splash', 1), ('splash', 3), ('splash', L + 50),
                                          ('pallas_gpu', 0)])
def test_each_kernel_equals_the_explicit_attention_in_every_window(impl, window):
  assert_equals_explicit(attention.make_attention(impl), window)


def test_a_windowed_kernel_sharded_over_2_2_2_equals_the_explicit_attention():
  mesh = mesh_222()
  kernel = attention.make_attention('splash', mesh=mesh, batch_axes=('data', 'fsdp'), head_axes=('tensor',),
                                    kv_head_axes=('tensor',))
  # One callable, a shard_map'd kernel per window.
  for window in (3, 0):
    assert_equals_explicit(kernel, window, NamedSharding(mesh, P(('data', 'fsdp'), None, 'tensor', None)))


@pytest.mark.parametrize('impl', ['xla', 'splash', 'pallas_gpu'])
def test_no_window_is_the_call_without_one(impl):
  kernel = attention.make_attention(impl)
  q, k, v = qkv(jnp.float32)
  np.testing.assert_array_equal(kernel(q, k, v, packed_rows(), window=0), kernel(q, k, v, packed_rows()))


def test_pallas_gpu_refuses_a_window():
  q, k, v = qkv(jnp.float32)
  with pytest.raises(ValueError, match='no sliding window, and window=4'):
    attention.make_attention('pallas_gpu')(q, k, v, packed_rows(), window=4)


def model_config(remat='save_matmuls_and_attention'):
  c = tiny_config()
  c.model.update(n_heads=4, n_kv_heads=2, head_dim=32, remat=remat)
  c.data.update(seq_len=128, global_batch_size=4)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  return c


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['pallas_gpu', 'splash'])
def test_a_train_step_with_each_kernel_equals_the_xla_one(impl):
  """Same loss and same updated parameters on a (2, 2, 2) mesh, packed rows included."""
  rows = dryrun.random_batch(4, 128, 320, seed=0)
  rows['segment_ids'] = np.repeat(np.arange(1, 5), [30, 50, 40, 8])[None].repeat(4, 0).astype(np.int32)
  results = []
  for name in ('xla', impl):
    config = model_config()
    config.attention.impl = name
    mesh = train.make_mesh(config)
    program = train.build(config, mesh, np.ones(320, np.int32))
    state, metrics = program.train_step(program.init(0), sharding.host_batch_to_global(rows, program.batch_sharding))
    results.append((float(metrics['loss']), jax.device_get(state.params)))
  (loss_xla, params_xla), (loss, params) = results
  np.testing.assert_allclose(loss, loss_xla, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, params_xla)


def tiny_model(remat: str):
  cfg = ModelConfig(**model_config(remat=remat).model.to_dict())
  with nnx.use_eager_sharding(False):
    return nnx.split(Transformer(cfg, nnx.Rngs(0)))


def pallas_calls_in_gradient(remat: str) -> int:
  """How many Pallas kernels the forward + backward of the model runs (the layer scan's
  body counts once): 3 without recomputation (forward, backward preprocessing,
  backward), 4 when the backward pass recomputes the forward kernel."""
  graphdef, params = tiny_model(remat)
  kernel = attention.make_attention('pallas_gpu')
  tokens = jnp.zeros((1, 128), jnp.int32)
  loss = lambda p: nnx.merge(graphdef, p)(tokens, tokens, tokens + 1, kernel).sum()
  closed = jax.make_jaxpr(jax.value_and_grad(loss))(params)
  # Without the dead code (the unused recomputation), as XLA will run it.
  live, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  return str(live).count('pallas_call[')


def test_saving_the_attention_keeps_the_flash_residuals():
  counts = {remat: pallas_calls_in_gradient(remat) for remat in REMAT_POLICIES}
  assert counts == {'save_everything': 3, 'save_nothing': 4, 'save_matmuls': 4, 'save_attention': 3,
                    'save_matmuls_and_attention': 3}


@pytest.mark.slow
def test_every_remat_policy_gives_the_same_gradient():
  tokens = jax.random.randint(jax.random.key(0), (2, 128), 0, 320)
  grads = []
  for remat in REMAT_POLICIES:
    graphdef, params = tiny_model(remat)
    grads.append(jax.grad(lambda p: nnx.merge(graphdef, p)(tokens, tokens, jnp.ones_like(tokens)).sum())(params))
  for g in grads[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, grads[0])


@pytest.mark.parametrize('backend, dtype, seq_len, head_dim, chosen', [
    ('gpu', jnp.bfloat16, 2048, 128, 'cudnn'),  # measured fastest on a GPU
    ('gpu', jnp.float32, 2048, 128, 'pallas_gpu'),  # cuDNN runs bf16/fp16 only
    ('gpu', jnp.bfloat16, 2048, 256, 'pallas_gpu'),  # cuDNN: head dim at most 128
    ('gpu', jnp.float32, 1000, 128, 'xla'),  # no kernel block divides 1000
    ('tpu', jnp.bfloat16, 2048, 128, 'splash'),
    ('tpu', jnp.bfloat16, 200, 128, 'xla'),
    ('cpu', jnp.bfloat16, 2048, 128, 'xla'),
])
def test_auto_chooses_the_fastest_that_can_run(backend, dtype, seq_len, head_dim, chosen):
  assert attention.choose('auto', backend, dtype, seq_len, head_dim) == chosen


@pytest.mark.parametrize('backend, dtype, window, chosen', [
    ('gpu', jnp.bfloat16, 1, 'cudnn'),
    ('gpu', jnp.bfloat16, 4096, 'cudnn'),
    ('gpu', jnp.float32, 4096, 'xla'),  # pallas_gpu has no window
    ('tpu', jnp.bfloat16, 4096, 'splash'),
])
def test_auto_with_a_window_never_chooses_pallas_gpu(backend, dtype, window, chosen):
  assert attention.choose('auto', backend, dtype, 2048, 128, window=window) == chosen


@pytest.mark.parametrize('window, message', [
    (4, 'pallas_gpu attention has no sliding window, and window=4'),
    (-1, 'the attention window must be 0 \\(none\\) or positive, not -1'),
])
def test_a_window_that_cannot_run_is_a_value_error(window, message):
  with pytest.raises(ValueError, match=message):
    attention.choose('pallas_gpu', 'gpu', jnp.bfloat16, 2048, 128, window=window)


def test_auto_logs_its_choice_and_what_it_passed_over(caplog):
  attention._log_choice.cache_clear()
  with caplog.at_level(logging.INFO, logger='salt'):
    attention.choose('auto', 'gpu', jnp.float32, 2048, 64)
    attention.choose('auto', 'gpu', jnp.float32, 2048, 64)
  lines = [r.getMessage() for r in caplog.records]
  assert lines == ['attention on gpu: pallas_gpu; passed over: cudnn attention needs bfloat16 or float16 '
                   'activations, not float32']


@pytest.mark.parametrize('impl, message', [
    ('cudnn', "attention.impl='cudnn': cudnn runs on gpu, not cpu"),
    ('splash', "attention.impl='splash': splash needs a sequence length that is a multiple of 128, not 32"),
])
def test_an_implementation_named_that_cannot_run_is_a_user_error(impl, message):
  config = tiny_config()
  config.attention.impl = impl
  with pytest.raises(UserError, match=message):
    train.build(config, train.make_mesh(config), np.ones(320, np.int32))


def test_pallas_gpu_lowers_to_triton_for_an_h100():
  """Lowered for an abstract H100 without a GPU; Triton compiles the IR on the device."""
  from jax._src.mesh import AbstractDevice  # the public API takes it but does not export it

  kernel = attention.make_attention('pallas_gpu', interpret=False)
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)

  def forward_and_backward(q, k, v, segments):
    return jax.grad(lambda q, k, v: kernel(q, k, v, segments).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)

  h100 = AbstractDevice(device_kind='NVIDIA H100 80GB HBM3', num_cores=132, platform='cuda')
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ('x',), abstract_device=h100)):
    lowered = jax.jit(forward_and_backward).trace(
        shape(2, 512, 4, 128), shape(2, 512, 2, 128), shape(2, 512, 2, 128), shape(2, 512, dtype=jnp.int32)
    ).lower(lowering_platforms=('cuda',))
  text = lowered.as_text()
  assert text.count('__gpu$xla.gpu.triton') == 3  # forward, backward preprocessing, backward
  assert '512x512' not in text  # no [L, L] scores or mask anywhere


@pytest.mark.parametrize('window', [0, 100])
def test_splash_lowers_for_mosaic_tpu(window):
  kernel = attention.make_attention('splash', interpret=False)
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)

  def forward_and_backward(q, k, v, segments):
    return jax.grad(lambda q, k, v: kernel(q, k, v, segments, window=window).astype(jnp.float32).sum(),
                    (0, 1, 2))(q, k, v)

  exported = jax.export.export(jax.jit(forward_and_backward), platforms=['tpu'])(
      shape(2, 1024, 4, 128), shape(2, 1024, 2, 128), shape(2, 1024, 2, 128), shape(2, 1024, dtype=jnp.int32))
  text = exported.mlir_module()
  assert text.count('tpu_custom_call') == 3  # forward, dq, dkv
  assert '1024x1024' not in text  # no [L, L] scores or mask anywhere
