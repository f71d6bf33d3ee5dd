"""The Pallas TPU loss kernels compile with Mosaic for v5e, v5p and v6e at the widths and
vocabularies (one device's shard of them) of real models, in bf16, forward and backward,
with and without a teacher: the blocks chosen from each generation's VMEM fit it."""

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kernels import weighted_loss

pytestmark = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                reason='the TPU compile tier needs libtpu (make test-tpu)')

TOKENS = 4096  # per device: e.g. 2 rows of 2048


def one_device(accelerator_type: str) -> Mesh:
  from trainer.dryrun import topology_target

  return Mesh(topology_target(accelerator_type, 1).devices[:1], ('x',))


@pytest.mark.parametrize('accelerator_type', ['v5litepod-8', 'v5p-8', 'v6e-8'])
@pytest.mark.parametrize('widths, vocab', [((1024,), 32768), ((2048, 1024), 131072), ((2560, 2048), 32000),
                                           ((4096, 2048), 262144), ((8192, 4096), 65536)])
def test_the_pallas_loss_kernels_compile_for_a_real_tpu(accelerator_type, widths, vocab):
  mesh = one_device(accelerator_type)
  on_device = NamedSharding(mesh, P())
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype, sharding=on_device)
  teacher = (shape(TOKENS, widths[1]), shape(widths[1], vocab)) if len(widths) == 2 else None
  weights = jnp.full((TOKENS,), 0.5)

  def loss(h, w, targets, teacher):
    return weighted_loss(h, w, targets, teacher, weights, weights, impl='pallas', mesh=mesh)[0]

  compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(
      shape(TOKENS, widths[0]), shape(widths[0], vocab), shape(TOKENS, dtype=jnp.int32),
      teacher).compile()
  assert compiled.as_text().count('tpu_custom_call') >= 3
