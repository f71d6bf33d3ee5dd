"""A decoder-only Transformer (Llama-style) in Flax NNX.

RMSNorm, rotary position embeddings, grouped-query attention and a gated MLP, with
the layers stacked on a leading axis and applied by `jax.lax.scan`. Attention stays
inside a document of a packed row (segment ids). The model returns final hidden
states; the unembedding is a separate matrix so that the loss can stream over the
vocabulary without ever building the logits.

The families salt imports (trainer/families) differ from this base block by a few
switches: q/k/v biases (Qwen2), norms of the queries and keys and after each sublayer,
a GELU MLP and a scaled embedding (Gemma 3), and sliding-window attention on every
layer (Mistral) or on all but every n-th layer, with its own RoPE base (Gemma 3).

Every parameter carries logical axis names (`embed`, `vocab`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `layers`, `norm`); `trainer.sharding` maps them to mesh axes.

`Transformer.decode` runs the same layers one document per row over a KV cache, a few
tokens at a time (`salt sample`, trainer/decode.py).

Shapes in names:
  B batch, L sequence length, D model width, H query heads, K key/value heads,
  G query heads per key/value head (H = K * G), E head dim, F MLP width,
  V vocabulary, N layers, S the slots of a KV cache.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from kernels.attention import Attention, reference


DTYPES = ('float32', 'bfloat16')
ROPE_SCALINGS = ('none', 'linear', 'llama3')
ACTIVATIONS = {'silu': jax.nn.silu, 'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True)}


def _shapes(default):
  """A field that decides the shapes of the parameters (a checkpoint of another value
  cannot be restored into this model)."""
  return dataclasses.field(default=default, metadata={'shapes': True})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's settings: the config's `model` group, whose keys and defaults these are."""
  vocab_size: int = _shapes(32000)
  d_model: int = _shapes(512)
  n_layers: int = _shapes(8)
  n_heads: int = _shapes(8)
  n_kv_heads: int = _shapes(8)
  head_dim: int = _shapes(64)
  d_ff: int = _shapes(1408)
  rope_theta: float = 10000.0
  # Rotary frequencies rescaled for contexts longer than the model was trained on, as
  # Hugging Face's `rope_scaling` (see rope_frequencies, and models imported with `salt
  # import-teacher`): one of ROPE_SCALINGS; the last three fields are llama3's.
  rope_scaling: str = 'none'
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  norm_eps: float = 1e-5
  tie_embeddings: bool = _shapes(False)
  # The Hugging Face family the model is exported as (trainer/families), and its
  # differences from the base block.
  family: str = 'llama'
  qkv_bias: bool = _shapes(False)
  qk_norm: bool = _shapes(False)  # RMSNorm of each query and key head before RoPE
  post_norms: bool = _shapes(False)  # RMSNorm of each sublayer's output before the residual add
  mlp_activation: str = 'silu'  # of the gate; one of ACTIVATIONS
  embed_scale: bool = False  # the embedding times sqrt(d_model)
  norm_plus_one: bool = False  # norms scale by 1 + w, w starting at 0 (Gemma's; kept as w, exact in bf16)
  # Sliding-window attention (a token sees the last `sliding_window` tokens of its
  # document; 0: all of them) on every layer, or with `global_layer_every` = n on all
  # but every n-th; `rope_local_theta` is the windowed layers' RoPE base, unscaled
  # (0: as the global layers).
  sliding_window: int = 0
  global_layer_every: int = 0
  rope_local_theta: float = 0.0
  init_std: float = 0.02
  dtype: str = 'bfloat16'  # compute dtype (one of DTYPES); parameters are always float32
  # What the backward pass keeps of each layer (one of REMAT_POLICIES); the rest is
  # recomputed. 'attention' is the attention output and the flash kernels' residuals.
  remat: str = 'save_everything'

  @classmethod
  def shape_keys(cls) -> tuple[str, ...]:
    """The settings that decide the shapes of the parameters."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get('shapes'))

  def problems(self) -> list[str]:
    """What is wrong with these settings, one line each, named as config keys."""
    found = [f'model.{key}={getattr(self, key)} must be positive'
             for key in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'd_ff')
             if getattr(self, key) <= 0]
    found += [f'model.{key}={getattr(self, key)} must not be negative'
              for key in ('sliding_window', 'global_layer_every', 'rope_local_theta') if getattr(self, key) < 0]
    checks = [
        (self.dtype in DTYPES, f'model.dtype={self.dtype!r} must be one of {DTYPES}'),
        (self.remat in REMAT_POLICIES, f'model.remat={self.remat!r} must be one of {tuple(REMAT_POLICIES)}'),
        (found or self.n_heads % self.n_kv_heads == 0,
         f'model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}'),
        (self.head_dim % 2 == 0, f'model.head_dim={self.head_dim} must be even for rotary embeddings'),
        (self.rope_scaling in ROPE_SCALINGS,
         f'model.rope_scaling={self.rope_scaling!r} must be one of {ROPE_SCALINGS}'),
        (self.rope_scaling_factor > 0, f'model.rope_scaling_factor={self.rope_scaling_factor} must be positive'),
        (self.mlp_activation in ACTIVATIONS,
         f'model.mlp_activation={self.mlp_activation!r} must be one of {tuple(ACTIVATIONS)}'),
        (self.sliding_window or not (self.global_layer_every or self.rope_local_theta),
         'model.global_layer_every and model.rope_local_theta apply to sliding-window layers: set '
         'model.sliding_window too'),
        (self.rope_scaling != 'llama3' or 0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
         f'model.rope_low_freq_factor={self.rope_low_freq_factor} and model.rope_high_freq_factor='
         f'{self.rope_high_freq_factor} must satisfy 0 < low < high'),
    ]
    return found + [message for ok, message in checks if not ok]


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> nnx.Param:
  init = nnx.with_partitioning(nnx.initializers.normal(std), axes)
  return nnx.Param(init(rngs.params(), shape, jnp.float32))


def _ones(shape: tuple[int, ...], axes: tuple[str, ...]) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(nnx.initializers.ones, axes)(None, shape, jnp.float32))


def _zeros(shape: tuple[int, ...], axes: tuple[str, ...]) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, axes)(None, shape, jnp.float32))


def _norm_scale(cfg: ModelConfig, size: int) -> nnx.Param:
  return (_zeros if cfg.norm_plus_one else _ones)((size,), ('norm',))


def _normed(cfg: ModelConfig, x: jax.Array, scale: nnx.Param) -> jax.Array:
  w = scale[...].astype(jnp.float32)
  return rms_norm(x, 1 + w if cfg.norm_plus_one else w, cfg.norm_eps)


def rms_norm(x_BxLxD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  x = x_BxLxD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return (x * scale_D).astype(x_BxLxD.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
  """The [E/2] angular frequencies of the rotary embeddings, rescaled as Hugging Face does.

  'linear' divides every frequency by the factor. 'llama3' (Llama 3.1 and later)
  keeps the frequencies whose wavelength is below original_max / high_freq_factor,
  divides those above original_max / low_freq_factor by the factor, and blends the two
  in between, so that imported models see positions exactly as they were trained to.
  """
  half = cfg.head_dim // 2
  freq_E2 = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if cfg.rope_scaling == 'linear':
    return freq_E2 / cfg.rope_scaling_factor
  if cfg.rope_scaling == 'llama3':
    low, high, factor = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_scaling_factor
    wavelength_E2 = 2 * jnp.pi / freq_E2
    smooth_E2 = (cfg.rope_original_max_positions / wavelength_E2 - low) / (high - low)
    blended_E2 = (1 - smooth_E2) * freq_E2 / factor + smooth_E2 * freq_E2
    return jnp.where(wavelength_E2 < cfg.rope_original_max_positions / high, freq_E2,
                     jnp.where(wavelength_E2 > cfg.rope_original_max_positions / low, freq_E2 / factor, blended_E2))
  return freq_E2


def local_layers(cfg: ModelConfig) -> np.ndarray:
  """[N] booleans: which layers attend through the sliding window."""
  index_N = np.arange(cfg.n_layers)
  if not cfg.sliding_window:
    return np.zeros(cfg.n_layers, bool)
  return (index_N + 1) % cfg.global_layer_every != 0 if cfg.global_layer_every else np.ones(cfg.n_layers, bool)


def rotary(x_BxLxHxE: jax.Array, positions_BxL: jax.Array, freq_E2: jax.Array) -> jax.Array:
  """Rotates the two halves of each head (the Llama / Hugging Face convention) by
  position x the [E/2] frequencies of `rope_frequencies`."""
  angle_BxLx1xE2 = (positions_BxL[..., None].astype(jnp.float32) * freq_E2)[:, :, None, :]
  sin, cos = jnp.sin(angle_BxLx1xE2), jnp.cos(angle_BxLx1xE2)
  x1, x2 = jnp.split(x_BxLxHxE.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxE.dtype)


class Block(nnx.Module):
  """One pre-norm Transformer layer: attention then a gated MLP, each residual."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    D, H, K, E, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    in_std = D ** -0.5
    # Output projections shrink with depth so the residual stream keeps its scale.
    out_std = (2 * cfg.n_layers * D) ** -0.5
    self.attn_norm = _norm_scale(cfg, D)
    self.wq_DxHxE = _param(rngs, (D, H, E), ('embed', 'heads', 'head_dim'), in_std)
    self.wk_DxKxE = _param(rngs, (D, K, E), ('embed', 'kv_heads', 'head_dim'), in_std)
    self.wv_DxKxE = _param(rngs, (D, K, E), ('embed', 'kv_heads', 'head_dim'), in_std)
    self.wo_HxExD = _param(rngs, (H, E, D), ('heads', 'head_dim', 'embed'), out_std)
    self.mlp_norm = _norm_scale(cfg, D)
    self.w_gate_DxF = _param(rngs, (D, F), ('embed', 'mlp'), in_std)
    self.w_up_DxF = _param(rngs, (D, F), ('embed', 'mlp'), in_std)
    self.w_down_FxD = _param(rngs, (F, D), ('mlp', 'embed'), out_std)
    if cfg.qkv_bias:
      self.bq_HxE = _zeros((H, E), ('heads', 'head_dim'))
      self.bk_KxE = _zeros((K, E), ('kv_heads', 'head_dim'))
      self.bv_KxE = _zeros((K, E), ('kv_heads', 'head_dim'))
    if cfg.qk_norm:
      self.q_norm = _norm_scale(cfg, E)
      self.k_norm = _norm_scale(cfg, E)
    if cfg.post_norms:
      self.attn_out_norm = _norm_scale(cfg, D)
      self.mlp_out_norm = _norm_scale(cfg, D)

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array,
               local: jax.Array, attention: Attention) -> jax.Array:
    """`local`: a boolean scalar, whether this layer attends through the sliding window."""
    q, k, v = self._queries_keys_values(x_BxLxD, positions_BxL, local)
    attn_BxLxHxE = checkpoint_name(_attend(self.cfg, attention, local, q, k, v, segment_ids_BxL), 'attention')
    return self._after_attention(x_BxLxD, attn_BxLxHxE)

  def cached(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, local: jax.Array, k_BxSxKxE: jax.Array,
             v_BxSxKxE: jax.Array, slot_positions_BxS: jax.Array,
             index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The layer on L new tokens of one document per row, written into cache slots
    [index, index + L) whose positions `slot_positions_BxS` already holds; returns the
    output and the updated cache."""
    q, k, v = self._queries_keys_values(x_BxLxD, positions_BxL, local)
    k_BxSxKxE = jax.lax.dynamic_update_slice_in_dim(k_BxSxKxE, k.astype(k_BxSxKxE.dtype), index, axis=1)
    v_BxSxKxE = jax.lax.dynamic_update_slice_in_dim(v_BxSxKxE, v.astype(v_BxSxKxE.dtype), index, axis=1)
    mask = cache_mask(positions_BxL, slot_positions_BxS, self.cfg.sliding_window, local)
    attn_BxLxHxE = jax.nn.dot_product_attention(q, k_BxSxKxE, v_BxSxKxE, mask=mask)
    return self._after_attention(x_BxLxD, attn_BxLxHxE), k_BxSxKxE, v_BxSxKxE

  def _queries_keys_values(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
                           local: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, L, H, E], k and v [B, L, K, E]: projected, normed and rotated as the layer's
    attention takes them."""
    cfg, dtype = self.cfg, x_BxLxD.dtype
    h = _normed(cfg, x_BxLxD, self.attn_norm)
    q = jnp.einsum('bld,dhe->blhe', h, self.wq_DxHxE[...].astype(dtype))
    k = jnp.einsum('bld,dke->blke', h, self.wk_DxKxE[...].astype(dtype))
    v = jnp.einsum('bld,dke->blke', h, self.wv_DxKxE[...].astype(dtype))
    if cfg.qkv_bias:
      q, k, v = (x + b[...].astype(dtype) for x, b in ((q, self.bq_HxE), (k, self.bk_KxE), (v, self.bv_KxE)))
    if cfg.qk_norm:
      q, k = _normed(cfg, q, self.q_norm), _normed(cfg, k, self.k_norm)
    freq_E2 = rope_frequencies(cfg)
    if cfg.rope_local_theta:
      freq_E2 = jnp.where(local, rope_frequencies(local_rope(cfg)), freq_E2)
    return rotary(q, positions_BxL, freq_E2), rotary(k, positions_BxL, freq_E2), v

  def _after_attention(self, x_BxLxD: jax.Array, attn_BxLxHxE: jax.Array) -> jax.Array:
    """The attention's output projection and residual, then the MLP and its residual."""
    cfg, dtype = self.cfg, x_BxLxD.dtype
    out_BxLxD = jnp.einsum('blhe,hed->bld', attn_BxLxHxE, self.wo_HxExD[...].astype(dtype))
    if cfg.post_norms:
      out_BxLxD = _normed(cfg, out_BxLxD, self.attn_out_norm)
    x_BxLxD = x_BxLxD + out_BxLxD

    h = _normed(cfg, x_BxLxD, self.mlp_norm)
    gate = jnp.einsum('bld,df->blf', h, self.w_gate_DxF[...].astype(dtype))
    up = jnp.einsum('bld,df->blf', h, self.w_up_DxF[...].astype(dtype))
    out_BxLxD = jnp.einsum('blf,fd->bld', ACTIVATIONS[cfg.mlp_activation](gate) * up,
                           self.w_down_FxD[...].astype(dtype))
    if cfg.post_norms:
      out_BxLxD = _normed(cfg, out_BxLxD, self.mlp_out_norm)
    return x_BxLxD + out_BxLxD


def local_rope(cfg: ModelConfig) -> ModelConfig:
  """The settings whose `rope_frequencies` are the sliding-window layers' (Gemma 3's
  own base, unscaled)."""
  return dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling='none')


def _attend(cfg: ModelConfig, attention: Attention, local: jax.Array, q, k, v, segment_ids) -> jax.Array:
  window = cfg.sliding_window
  if not window:
    return attention(q, k, v, segment_ids)
  if not cfg.global_layer_every:
    return attention(q, k, v, segment_ids, window=window)
  # The kernels take the window as a static size, so a stack of mixed layers picks one
  # of two compiled calls per layer.
  return jax.lax.cond(local, functools.partial(attention, window=window), attention, q, k, v, segment_ids)


def cache_mask(positions_BxL: jax.Array, slot_positions_BxS: jax.Array, window: int, local: jax.Array) -> jax.Array:
  """[B, 1, L, S] booleans: the query at each position may attend to the cache slot
  (one document per row: the slot holds a position, not -1, at most the query's, and
  within the window when the layer is `local`)."""
  q_BxLx1, k_Bx1xS = positions_BxL[:, :, None], slot_positions_BxS[:, None, :]
  visible = (k_Bx1xS >= 0) & (k_Bx1xS <= q_BxLx1)
  if window:
    visible &= ~local | (q_BxLx1 - k_Bx1xS < window)
  return visible[:, None]


class KVCache(NamedTuple):
  """Every layer's keys and values of the tokens decoded so far, one document per row.
  Slots are filled in order; a slot of padding, or not yet filled, has position -1."""
  k_NxBxSxKxE: jax.Array
  v_NxBxSxKxE: jax.Array
  positions_BxS: jax.Array


def empty_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
  """A cache of `length` slots per row, in the compute dtype."""
  shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
  return KVCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype), jnp.full((batch, length), -1, jnp.int32))


# What the backward pass keeps of each layer's forward pass; the rest it recomputes.
# 'attention' is the attention output, and with the Pallas kernels their flash
# residuals (the softmax statistics) too; 'matmuls' the outputs of the projections.
_policies = jax.checkpoint_policies
REMAT_POLICIES = {
    'save_everything': None,  # no recomputation
    'save_nothing': _policies.nothing_saveable,
    'save_matmuls': _policies.dots_with_no_batch_dims_saveable,
    'save_attention': _policies.save_only_these_names('attention'),
    'save_matmuls_and_attention': _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable, _policies.save_only_these_names('attention')),
}


class Transformer(nnx.Module):
  """tokens, positions, segment ids [B, L] -> final hidden states [B, L, D].

  `attention` is the attention kernel (kernels.attention.make_attention); the XLA
  reference by default.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    D, V = cfg.d_model, cfg.vocab_size
    self.embed_VxD = _param(rngs, (V, D), ('vocab', 'embed'), cfg.init_std)
    layer_keys = jax.random.split(rngs.params(), cfg.n_layers)
    self.layers = nnx.vmap(
        lambda key: Block(cfg, nnx.Rngs(params=key)),
        transform_metadata={nnx.PARTITION_NAME: 'layers'},
    )(layer_keys)
    self.final_norm = _norm_scale(cfg, D)
    if not cfg.tie_embeddings:
      self.unembed_DxV = _param(rngs, (D, V), ('embed', 'vocab'), D ** -0.5)

  def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array,
               attention: Attention = reference) -> jax.Array:
    cfg = self.cfg
    x_BxLxD = self._embed(tokens_BxL)
    graphdef, layers = nnx.split(self.layers)

    def layer(x, layer_params_and_local):
      layer_params, local = layer_params_and_local
      return nnx.merge(graphdef, layer_params)(x, positions_BxL, segment_ids_BxL, local, attention), None

    if cfg.remat != 'save_everything':
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat])
    x_BxLxD, _ = jax.lax.scan(layer, x_BxLxD, (layers, jnp.asarray(local_layers(cfg))))
    return _normed(cfg, x_BxLxD, self.final_norm)

  def decode(self, tokens_BxL: jax.Array, positions_BxL: jax.Array, cache: KVCache,
             index: jax.Array) -> tuple[jax.Array, KVCache]:
    """Final hidden states [B, L, D] of L new tokens per row, each row one document
    whose earlier tokens are in `cache`; the tokens go into slots [index, index + L).
    A position of -1 is padding, which no token attends to. Equals `__call__` over the
    whole document, computed once per token."""
    cfg = self.cfg
    x_BxLxD = self._embed(tokens_BxL)
    slot_positions_BxS = jax.lax.dynamic_update_slice_in_dim(cache.positions_BxS, positions_BxL, index, axis=1)
    graphdef, layers = nnx.split(self.layers)

    def layer(x, inputs):
      layer_params, local, k_BxSxKxE, v_BxSxKxE = inputs
      x, k_BxSxKxE, v_BxSxKxE = nnx.merge(graphdef, layer_params).cached(
          x, positions_BxL, local, k_BxSxKxE, v_BxSxKxE, slot_positions_BxS, index)
      return x, (k_BxSxKxE, v_BxSxKxE)

    x_BxLxD, (k, v) = jax.lax.scan(layer, x_BxLxD, (layers, jnp.asarray(local_layers(cfg)), cache.k_NxBxSxKxE,
                                                    cache.v_NxBxSxKxE))
    return _normed(cfg, x_BxLxD, self.final_norm), KVCache(k, v, slot_positions_BxS)

  def _embed(self, tokens_BxL: jax.Array) -> jax.Array:
    cfg = self.cfg
    x_BxLxD = self.embed_VxD[...].astype(cfg.dtype)[tokens_BxL]
    if cfg.embed_scale:
      x_BxLxD = x_BxLxD * jnp.asarray(cfg.d_model ** 0.5, cfg.dtype)
    return x_BxLxD

  def unembedding(self) -> jax.Array:
    """The [D, V] output matrix (the transposed embedding when tied), float32."""
    return self.embed_VxD[...].T if self.cfg.tie_embeddings else self.unembed_DxV[...]


def param_count(cfg: ModelConfig) -> int:
  D, H, K, E, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  per_layer = D * E * (2 * H + 2 * K) + 3 * D * F + 2 * D
  per_layer += cfg.qkv_bias * (H + 2 * K) * E + cfg.qk_norm * 2 * E + cfg.post_norms * 2 * D
  return cfg.n_layers * per_layer + V * D * (1 if cfg.tie_embeddings else 2) + D


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x matmul parameters + attention scores (PaLM, appendix B).

  The embedding lookup is not a matmul; the unembedding is. Attention counts the full
  L x L score matrix, as MaxText and PaLM do, so MFU figures compare across trainers.
  """
  D, H, K, E, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  matmul_params = cfg.n_layers * (D * E * (2 * H + 2 * K) + 3 * D * F) + D * V
  attention = 12 * cfg.n_layers * H * E * seq_len
  return 6 * matmul_params + attention


def recompute_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """The FLOPs per token the backward pass spends recomputing what the remat policy did
  not save: the projections' forward (2 per parameter) where matmuls are not kept, the
  attention's forward (the scores, and the flash kernels' forward) where it is not."""
  D, H, K, E, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  matmuls = 2 * (D * E * (2 * H + 2 * K) + 3 * D * F)
  attention = 4 * H * E * seq_len
  redone = {'save_everything': 0, 'save_nothing': matmuls + attention, 'save_matmuls': attention,
            'save_attention': matmuls, 'save_matmuls_and_attention': 0}[cfg.remat]
  return cfg.n_layers * redone
