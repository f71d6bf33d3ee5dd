"""Attention inside the documents of packed rows: every implementation against the XLA reference.

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


def test_splash_lowers_for_mosaic_tpu():
  kernel = attention.make_attention('splash', interpret=False)
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)

  def forward_and_backward(q, k, v, segments):
    return jax.grad(lambda q, k, v: kernel(q, k, v, segments).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)

  exported = jax.export.export(jax.jit(forward_and_backward), platforms=['tpu'])(
      shape(2, 1024, 4, 128), shape(2, 1024, 2, 128), shape(2, 1024, 2, 128), shape(2, 1024, dtype=jnp.int32))
  text = exported.mlir_module()
  assert text.count('tpu_custom_call') == 3  # forward, dq, dkv
  assert '1024x1024' not in text  # no [L, L] scores or mask anywhere
