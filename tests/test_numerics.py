"""A pinned step: the tiny model's loss and gradient norm over three steps on fixed tokens.

A change anywhere in the numerics (initialisation, model, loss, optimizer, sharding)
moves these numbers; the test says so at once. When a change is meant to move them,
say why in the commit and pin the new values.
"""

import jax
import numpy as np
import pytest

from tests.helpers import tiny_config
from trainer import sharding, step, train
from trainer.config import mesh_shape

# tests/helpers.py:tiny_config on 8 CPU devices (data=8), fp32, seed 0; the learning rate
# warms up from 0, so the parameters first move in step 2 and the loss in step 3.
PINNED = [
    {'loss': 6.174999713897705, 'grad_norm': 8.053845405578613},
    {'loss': 6.174999713897705, 'grad_norm': 8.053845405578613},
    {'loss': 5.442843437194824, 'grad_norm': 6.752385139465332},
]


def fixed_batch(batch_size: int, seq_len: int, vocab: int) -> dict[str, np.ndarray]:
  tokens = np.random.default_rng(0).integers(0, vocab, (batch_size, seq_len + 1))
  positions = np.broadcast_to(np.arange(seq_len), (batch_size, seq_len))
  return {'inputs': tokens[:, :-1].astype(np.int32), 'targets': tokens[:, 1:].astype(np.int32),
          'positions': positions.astype(np.int32), 'segment_ids': np.ones((batch_size, seq_len), np.int32),
          'weights': np.ones((batch_size, seq_len), np.float32)}


def three_steps() -> list[dict[str, float]]:
  config = tiny_config()
  mesh = sharding.make_mesh(mesh_shape(config.mesh, jax.device_count()))
  program = train.build(config, mesh, np.ones(config.model.vocab_size, np.int32))
  batch = sharding.host_batch_to_global(
      fixed_batch(config.data.global_batch_size, config.data.seq_len, config.model.vocab_size), program.batch_sharding)
  state, out = program.init(config.seed), []
  for _ in range(3):
    state, metrics = program.train_step(state, batch)
    out.append({k: float(metrics[k]) for k in ('loss', 'grad_norm')})
  return out


def test_three_steps_of_the_tiny_model_give_the_pinned_loss_and_gradient_norm():
  assert step.BATCH_KEYS == tuple(fixed_batch(1, 1, 2))
  got = three_steps()
  for want, have in zip(PINNED, got):
    assert have == pytest.approx(want, rel=1e-5), got
