"""What the Hugging Face families share: reading config.json's fields, RoPE both ways,
and the Llama tensor layout the others extend.

nn.Linear weights are [out, in]; salt holds them [in, ...heads...] so each maps by a
transpose and a reshape alone:
  q_proj [H*E, D] -> wq [D, H, E]      k_proj, v_proj [K*E, D] -> wk, wv [D, K, E]
  o_proj [D, H*E] -> wo [H, E, D]      gate_proj, up_proj [F, D] -> [D, F]
  down_proj [D, F] -> [F, D]           lm_head [V, D] -> unembed [D, V]
"""

import math
from typing import Any, NamedTuple

from trainer.errors import UserError
from trainer.model import ModelConfig

CONFIG = 'config.json'


class Tensor(NamedTuple):
  """A Hugging Face tensor: its name, its shape there, and whether salt holds it
  transposed (every nn.Linear weight)."""
  name: str
  shape: tuple[int, ...]
  transposed: bool = False


# salt parameter -> its Hugging Face tensor; layer names hold {i}.
Layout = dict[str, Tensor]


def size(hf: dict, key: str, default: int | None = None, where: str = CONFIG) -> int:
  """A positive integer field of config.json (`default` where it is absent)."""
  value = field(hf, key, where) if default is None else hf.get(key) or default
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise UserError(f'{where} {key}={value!r} must be a positive integer')
  return value


def positive(hf: dict, key: str, default: float | None = None, where: str = CONFIG) -> float:
  """A positive finite number field of config.json (`default` where it is absent; a
  null is not absent)."""
  value = field(hf, key, where) if default is None else hf.get(key, default)
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
    raise UserError(f'{where} {key}={value!r} must be a positive number')
  return float(value)


def field(hf: dict, key: str, where: str = CONFIG) -> Any:
  if hf.get(key) is None:
    raise UserError(f'{where} has no {key!r}')
  return hf[key]


def refuse(hf: dict, unsupported: list[tuple[str, bool, str]]) -> None:
  """UserError for the first (key, present, why) that is present."""
  for key, present, why in unsupported:
    if present:
      raise UserError(f'{CONFIG} {key}={hf.get(key)!r} is not supported: {why}')


def sizes(hf: dict) -> dict[str, Any]:
  """The settings every family reads alike."""
  d_model, n_heads = size(hf, 'hidden_size'), size(hf, 'num_attention_heads')
  return dict(
      vocab_size=size(hf, 'vocab_size'), d_model=d_model, n_layers=size(hf, 'num_hidden_layers'),
      n_heads=n_heads, n_kv_heads=size(hf, 'num_key_value_heads', n_heads),
      head_dim=size(hf, 'head_dim', d_model // n_heads), d_ff=size(hf, 'intermediate_size'),
      norm_eps=positive(hf, 'rms_norm_eps', 1e-6), tie_embeddings=bool(hf.get('tie_word_embeddings', False)))


def rope(hf: dict, rope: dict | None = None, where: str | None = None) -> dict[str, Any]:
  """rope_theta and the scaling, from transformers 4's rope_theta and rope_scaling or
  transformers 5's rope_parameters (or the part of it `rope` names)."""
  if rope is None:
    rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
    where = f'{CONFIG} {"rope_parameters" if "rope_parameters" in hf else "rope_scaling"}'
  kind = rope.get('rope_type', rope.get('type', 'default'))
  theta = positive(rope, 'rope_theta', where=where) if 'rope_theta' in rope else positive(hf, 'rope_theta', 10000.0)
  settings = dict(rope_theta=theta)
  if kind == 'linear':
    settings.update(rope_scaling='linear', rope_scaling_factor=positive(rope, 'factor', where=where))
  elif kind == 'llama3':
    settings.update(
        rope_scaling='llama3', rope_scaling_factor=positive(rope, 'factor', where=where),
        rope_low_freq_factor=positive(rope, 'low_freq_factor', where=where),
        rope_high_freq_factor=positive(rope, 'high_freq_factor', where=where),
        rope_original_max_positions=size(rope, 'original_max_position_embeddings', where=where))
  elif kind != 'default':
    raise UserError(f'{where} type {kind!r} is not supported: salt implements default, linear and llama3 RoPE')
  return settings


def rope_scaling_to_hf(cfg: ModelConfig) -> dict | None:
  """transformers' rope_scaling for salt's settings (None: unscaled)."""
  if cfg.rope_scaling == 'linear':
    return {'rope_type': 'linear', 'factor': cfg.rope_scaling_factor}
  if cfg.rope_scaling == 'llama3':
    return {'rope_type': 'llama3', 'factor': cfg.rope_scaling_factor, 'low_freq_factor': cfg.rope_low_freq_factor,
            'high_freq_factor': cfg.rope_high_freq_factor,
            'original_max_position_embeddings': cfg.rope_original_max_positions}
  return None


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The config.json fields every family writes alike."""
  return {
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.d_model, 'intermediate_size': cfg.d_ff,
      'num_hidden_layers': cfg.n_layers, 'num_attention_heads': cfg.n_heads, 'num_key_value_heads': cfg.n_kv_heads,
      'head_dim': cfg.head_dim, 'rms_norm_eps': cfg.norm_eps, 'rope_theta': cfg.rope_theta,
      'rope_scaling': rope_scaling_to_hf(cfg), 'tie_word_embeddings': cfg.tie_embeddings,
      'initializer_range': cfg.init_std,
  }


def llama_tensors(cfg: ModelConfig) -> tuple[Layout, Layout]:
  """The parameters outside the layers, and those of layer {i}, by salt name."""
  D, H, K, E, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  outer = {'embed_VxD': Tensor('model.embed_tokens.weight', (V, D)), 'final_norm': Tensor('model.norm.weight', (D,))}
  if not cfg.tie_embeddings:
    outer['unembed_DxV'] = Tensor('lm_head.weight', (V, D), transposed=True)
  layer = {
      'attn_norm': Tensor('input_layernorm.weight', (D,)),
      'wq_DxHxE': Tensor('self_attn.q_proj.weight', (H * E, D), transposed=True),
      'wk_DxKxE': Tensor('self_attn.k_proj.weight', (K * E, D), transposed=True),
      'wv_DxKxE': Tensor('self_attn.v_proj.weight', (K * E, D), transposed=True),
      'wo_HxExD': Tensor('self_attn.o_proj.weight', (D, H * E), transposed=True),
      'mlp_norm': Tensor('post_attention_layernorm.weight', (D,)),
      'w_gate_DxF': Tensor('mlp.gate_proj.weight', (F, D), transposed=True),
      'w_up_DxF': Tensor('mlp.up_proj.weight', (F, D), transposed=True),
      'w_down_FxD': Tensor('mlp.down_proj.weight', (D, F), transposed=True),
  }
  return outer, in_layers(layer)


def in_layers(layer: Layout) -> Layout:
  return {key: t._replace(name='model.layers.{i}.' + t.name) for key, t in layer.items()}
