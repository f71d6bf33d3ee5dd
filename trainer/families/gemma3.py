"""Gemma 3 text (270M, 1B and the text towers of the larger ones).

Its differences from the base block: a GELU (tanh) MLP; RMSNorms of the queries and
keys, and after attention and the MLP as well as before; the embedding scaled by
sqrt(d_model); norms that scale by 1 + w; and sliding-window layers, five to each global one, with their own unscaled RoPE base.
"""

from typing import Any

from trainer.errors import UserError
from trainer.families import common
from trainer.model import ModelConfig

MODEL_TYPE = 'gemma3_text'
ARCHITECTURE = 'Gemma3ForCausalLM'
WINDOWED, GLOBAL = 'sliding_attention', 'full_attention'


def from_hf(hf: dict) -> dict[str, Any]:
  settings = common.sizes(hf)
  # transformers 4 wrote both names, and read hidden_activation.
  activation_key = 'hidden_activation' if hf.get('hidden_activation') else 'hidden_act'
  common.refuse(hf, [
      (activation_key, hf.get(activation_key, 'gelu_pytorch_tanh') not in ('gelu_pytorch_tanh', 'gelu_tanh'),
       "salt's Gemma MLP is GELU with the tanh approximation"),
      ('query_pre_attn_scalar', hf.get('query_pre_attn_scalar', settings['head_dim']) != settings['head_dim'],
       f'salt scales attention scores by head_dim ** -0.5; set it to head_dim={settings["head_dim"]}'),
      ('attn_logit_softcapping', hf.get('attn_logit_softcapping') is not None, 'salt does not cap attention logits'),
      ('final_logit_softcapping', hf.get('final_logit_softcapping') is not None, 'salt does not cap output logits'),
      ('use_bidirectional_attention', hf.get('use_bidirectional_attention'), 'salt trains causal models'),
      ('attention_bias', hf.get('attention_bias', False), "salt's Gemma has no attention bias"),
  ])
  settings.update(family=MODEL_TYPE, mlp_activation='gelu_tanh', qk_norm=True, post_norms=True, embed_scale=True,
                  norm_plus_one=True,
                  sliding_window=common.size(hf, 'sliding_window', 4096),
                  global_layer_every=_global_layer_every(hf, settings['n_layers']), **_rope(hf))
  return settings


def _global_layer_every(hf: dict, n_layers: int) -> int:
  """n where every n-th layer is global and the rest windowed (layer_types, or the older
  sliding_window_pattern)."""
  types = hf.get('layer_types')
  if types is None:
    every = common.size(hf, 'sliding_window_pattern', 6)
    return every if every <= n_layers else 0
  if len(types) != n_layers or set(types) - {WINDOWED, GLOBAL}:
    raise UserError(f'{common.CONFIG} layer_types must name {WINDOWED!r} or {GLOBAL!r} for each of the '
                    f'{n_layers} layers')
  every = types.index(GLOBAL) + 1 if GLOBAL in types else 0
  if types != _layer_types(every, n_layers):
    raise UserError(f'{common.CONFIG} layer_types={types} is not supported: salt windows every layer but each '
                    'n-th, which is global')
  return every


def _layer_types(every: int, n_layers: int) -> list[str]:
  """Every `every`-th layer global, the others windowed (all of them for 0)."""
  return [GLOBAL if every and (i + 1) % every == 0 else WINDOWED for i in range(n_layers)]


def _rope(hf: dict) -> dict[str, Any]:
  """The global layers' RoPE (which may be scaled) and the windowed layers' base."""
  parameters = hf.get('rope_parameters')
  if parameters and GLOBAL in parameters:
    where = f'{common.CONFIG} rope_parameters'
    local = parameters.get(WINDOWED) or {}
    if local.get('rope_type', 'default') != 'default':
      raise UserError(f'{where} {WINDOWED} rope_type={local["rope_type"]!r} is not supported: salt leaves the '
                      "windowed layers' RoPE unscaled")
    return dict(**common.rope(hf, parameters[GLOBAL], f'{where} {GLOBAL}'),
                rope_local_theta=common.positive(local, 'rope_theta', 10000.0, where=f'{where} {WINDOWED}'))
  return dict(**common.rope({'rope_theta': 1_000_000.0, **hf}),
              rope_local_theta=common.positive(hf, 'rope_local_base_freq', 10000.0))


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
  base = common.to_hf(cfg)
  return {**base, 'hidden_activation': 'gelu_pytorch_tanh', 'query_pre_attn_scalar': cfg.head_dim,
          'sliding_window': cfg.sliding_window, 'sliding_window_pattern': cfg.global_layer_every,
          'layer_types': _layer_types(cfg.global_layer_every, cfg.n_layers),
          'rope_local_base_freq': cfg.rope_local_theta or cfg.rope_theta, 'attention_bias': False,
          'final_logit_softcapping': None, 'attn_logit_softcapping': None}


def tensors(cfg: ModelConfig) -> tuple[common.Layout, common.Layout]:
  outer, layer = common.llama_tensors(cfg)
  D, E = cfg.d_model, cfg.head_dim
  norms = {'attn_norm': ('input_layernorm.weight', D), 'attn_out_norm': ('post_attention_layernorm.weight', D),
           'mlp_norm': ('pre_feedforward_layernorm.weight', D), 'mlp_out_norm': ('post_feedforward_layernorm.weight', D),
           'q_norm': ('self_attn.q_norm.weight', E), 'k_norm': ('self_attn.k_norm.weight', E)}
  layer.update(common.in_layers({key: common.Tensor(name, (size,)) for key, (name, size) in norms.items()}))
  return outer, layer
