"""Weight decay follows what a parameter is (its axes), not what it is called."""

import jax
import jax.numpy as jnp
from flax import nnx

from trainer import step
from trainer.model import ModelConfig
from trainer.optimizer import decay_mask


class Biased(nnx.Module):
  """A matrix, a bias and a stacked per-layer offset, none of them named like a norm."""

  def __init__(self):
    init = nnx.initializers.zeros
    self.kernel = nnx.Param(nnx.with_partitioning(init, ('embed', 'mlp'))(None, (4, 8), jnp.float32))
    self.bias = nnx.Param(nnx.with_partitioning(init, ('mlp',))(None, (8,), jnp.float32))
    self.offset = nnx.Param(nnx.with_partitioning(init, ('layers', 'embed'))(None, (2, 4), jnp.float32))


def test_a_vector_is_not_decayed_whatever_its_name():
  """Issue 24: the mask decayed every parameter whose path lacked 'norm', so a new bias
  would have been pulled to zero."""
  with nnx.use_eager_sharding(False):
    _, params = nnx.split(Biased())
  mask = nnx.to_pure_dict(decay_mask(params))
  assert mask == {'kernel': True, 'bias': False, 'offset': False}


def test_the_transformer_decays_its_matrices_and_no_norm_scale():
  cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
  _, params = step.abstract_model(cfg)
  flat = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(decay_mask(params)))
  assert {jax.tree_util.keystr(path): decayed for path, decayed in flat if not decayed} == \
      {jax.tree_util.keystr(path): False for path, _ in flat if 'norm' in jax.tree_util.keystr(path)}
  assert sum(decayed for _, decayed in flat) == len(flat) - 3  # attention, MLP and final norms


def test_the_families_biases_and_extra_norms_are_not_decayed():
  """Qwen2's [heads, head_dim] q/k/v biases have two axes but are not matrices."""
  cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32,
                    qkv_bias=True, qk_norm=True, post_norms=True, tie_embeddings=True)
  _, params = step.abstract_model(cfg)
  mask = nnx.to_pure_dict(decay_mask(params))
  assert {key for key, decayed in mask['layers'].items() if decayed} == \
      {'wq_DxHxE', 'wk_DxKxE', 'wv_DxKxE', 'wo_HxExD', 'w_gate_DxF', 'w_up_DxF', 'w_down_FxD'}
  assert {key for key, decayed in mask.items() if decayed is True} == {'embed_VxD'}
