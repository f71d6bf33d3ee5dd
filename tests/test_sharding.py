"""One program on any mesh: equal losses on 1 and 8 devices, parameters sharded by the rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.helpers import tiny_config
from trainer import data, sharding, train
from trainer.config import mesh_shape
from trainer.errors import UserError


def run_steps(config, data_dir, devices, steps=3):
  mesh = sharding.make_mesh(mesh_shape(config.mesh, len(devices)), devices)
  program = train.build(config, mesh, data.token_bytes(data_dir / 'tokenizer.model'))
  state = program.init(config.seed)
  stream = data.TokenStream(data_dir, 'train', config.data.seq_len)
  batches = data.train_batches(stream, global_batch=config.data.global_batch_size, seed=0,
                               first_step=0, num_steps=steps)
  losses = []
  for _ in range(steps):
    state, metrics = program.train_step(state, sharding.host_batch_to_global(next(batches), program.batch_sharding))
    losses.append(float(metrics['loss']))
  return losses, state


@pytest.fixture(scope='module')
def single_device_run(tiny_data):
  return run_steps(tiny_config(tiny_data), tiny_data, jax.devices()[:1])


# float32 on CPU: the meshes split the same sums differently, so results agree to
# float32 rounding accumulated over three Adam steps, not bit for bit.
@pytest.mark.parametrize('data_axis, fsdp, tensor', [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_same_losses_on_one_device_and_on_a_mesh(tiny_data, single_device_run, data_axis, fsdp, tensor):
  config = tiny_config(tiny_data)
  config.mesh.update(data=data_axis, fsdp=fsdp, tensor=tensor)
  losses, state = run_steps(config, tiny_data, jax.devices())
  want_losses, want_state = single_device_run
  np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_parameters_and_moments_are_sharded_as_the_rules_say(tiny_data):
  config = tiny_config(tiny_data)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  _, state = run_steps(config, tiny_data, jax.devices(), steps=1)
  layers = state.params['layers']
  # embed -> fsdp, mlp -> tensor, layers and norm -> replicated.
  assert layers['w_gate_DxF'].sharding.spec == P(None, 'fsdp', 'tensor')
  assert layers['wk_DxKxE'].sharding.spec == P(None, 'fsdp', 'tensor', None)
  assert layers['mlp_norm'].sharding.spec == P(None, None)
  assert state.params['embed_VxD'].sharding.spec == P('tensor', 'fsdp')
  # A shard of w_gate holds 1/4 of it: [2, 64/2, 128/2].
  assert layers['w_gate_DxF'].addressable_shards[0].data.shape == (2, 32, 64)
  adam_mu = state.opt_state[1][0].mu
  assert adam_mu['layers']['w_gate_DxF'].sharding.spec == P(None, 'fsdp', 'tensor')


def test_a_dimension_that_does_not_divide_is_a_clear_error(tiny_data):
  config = tiny_config(tiny_data)
  config.model.update(n_heads=4, n_kv_heads=1)
  config.mesh.update(data=4, fsdp=1, tensor=2)
  with pytest.raises(UserError, match="layers/wk_DxKxE has kv_heads of size 1, which does not divide over mesh axes tensor=2; "
                     "change the model size or sharding.kv_heads"):
    run_steps(config, tiny_data, jax.devices(), steps=1)
