"""The Transformer: document isolation in packed rows, logical axes, parameter count."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trainer import step
from trainer.model import ModelConfig, Transformer, param_count, rope_frequencies, rotary

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                  dtype='float32')


def model(cfg=CFG):
  with nnx.use_eager_sharding(False):
    return Transformer(cfg, nnx.Rngs(0))


def test_attention_stays_inside_each_document():
  # Row: document 1 at positions 0-5, document 2 at 6-11. Changing document 1's
  # tokens must leave document 2's hidden states exactly as they were.
  m = model()
  segments = jnp.array([[1] * 6 + [2] * 6])
  positions = jnp.array([list(range(6)) * 2])
  tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, 97)
  changed = tokens.at[0, :6].set((tokens[0, :6] + 5) % 97)
  before, after = m(tokens, positions, segments), m(changed, positions, segments)
  np.testing.assert_array_equal(before[0, 6:], after[0, 6:])
  assert not np.allclose(before[0, :6], after[0, :6])


def test_a_packed_document_equals_the_document_alone():
  m = model()
  tokens = jax.random.randint(jax.random.key(2), (1, 10), 0, 97)
  alone = m(tokens[:, 4:], jnp.arange(6)[None], jnp.ones((1, 6), jnp.int32))
  packed = m(tokens, jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]), jnp.array([[1] * 4 + [2] * 6]))
  np.testing.assert_allclose(packed[:, 4:], alone, rtol=1e-5, atol=1e-5)


def test_attention_is_causal():
  m = model()
  tokens = jax.random.randint(jax.random.key(3), (1, 8), 0, 97)
  changed = tokens.at[0, 5].set((tokens[0, 5] + 1) % 97)
  ones, positions = jnp.ones((1, 8), jnp.int32), jnp.arange(8)[None]
  np.testing.assert_array_equal(m(tokens, positions, ones)[0, :5], m(changed, positions, ones)[0, :5])


def test_every_parameter_names_its_axes():
  _, params = nnx.split(model(), nnx.Param)
  for path, variable in nnx.to_flat_state(params):
    axes = variable.get_metadata()['out_sharding']
    assert len(axes) == variable[...].ndim, path
  layer_axes = params['layers']['w_gate_DxF'].get_metadata()['out_sharding']
  assert layer_axes == ('layers', 'embed', 'mlp')


def test_param_count_counts_every_parameter():
  for tie in (False, True):
    cfg = ModelConfig(**{**CFG.__dict__, 'tie_embeddings': tie})
    _, params = nnx.split(model(cfg), nnx.Param)
    assert param_count(cfg) == sum(x.size for x in jax.tree.leaves(params))


def test_rotary_preserves_norm_and_encodes_relative_position():
  q = jax.random.normal(jax.random.key(4), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(5), (1, 1, 1, 8))
  freq = rope_frequencies(CFG)

  def score(pq, pk):
    return float((rotary(q, jnp.array([[pq]]), freq) * rotary(k, jnp.array([[pk]]), freq)).sum())

  np.testing.assert_allclose(jnp.linalg.norm(rotary(q, jnp.array([[7]]), freq)), jnp.linalg.norm(q), rtol=1e-6)
  np.testing.assert_allclose(score(3, 1), score(12, 10), rtol=1e-5)


def test_the_fields_marked_as_deciding_shapes_are_those_that_do():
  """Issue 24: the checkpoint's shape check read a list written by hand; it is derived
  from the schema, and the schema is checked against the parameters the model makes."""
  base = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
  shapes = lambda cfg: jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(step.abstract_model(cfg)[1]))
  changed = {'vocab_size': 96, 'd_model': 24, 'n_layers': 3, 'n_heads': 4, 'n_kv_heads': 2, 'head_dim': 4,
             'd_ff': 48, 'tie_embeddings': True, 'rope_theta': 500.0, 'rope_scaling': 'linear',
             'rope_scaling_factor': 2.0, 'rope_low_freq_factor': 2.0, 'rope_high_freq_factor': 8.0,
             'rope_original_max_positions': 64, 'norm_eps': 1e-6, 'init_std': 0.1, 'dtype': 'float32',
             'remat': 'save_nothing', 'family': 'qwen2', 'qkv_bias': True, 'qk_norm': True, 'post_norms': True,
             'mlp_activation': 'gelu_tanh', 'embed_scale': True, 'norm_plus_one': True, 'sliding_window': 4, 'global_layer_every': 2,
             'rope_local_theta': 100.0}
  assert set(changed) == {f.name for f in dataclasses.fields(ModelConfig)}  # a new field must be listed here
  deciding = {key for key, value in changed.items()
              if shapes(dataclasses.replace(base, **{key: value})) != shapes(base)}
  assert deciding == set(ModelConfig.shape_keys())
