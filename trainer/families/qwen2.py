"""Qwen2 and Qwen2.5: Llama with biases on the query, key and value projections."""

from typing import Any

from trainer.families import common
from trainer.model import ModelConfig

MODEL_TYPE = 'qwen2'
ARCHITECTURE = 'Qwen2ForCausalLM'


def from_hf(hf: dict) -> dict[str, Any]:
  common.refuse(hf, [
      ('use_sliding_window', hf.get('use_sliding_window', False),
       'salt windows every layer or every layer but each n-th, not the layers past max_window_layers'),
      ('hidden_act', hf.get('hidden_act', 'silu') not in ('silu', 'swish'), "Qwen2's MLP is SwiGLU (silu)"),
  ])
  return dict(family=MODEL_TYPE, qkv_bias=True, **common.sizes(hf), **common.rope(hf))


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
  return {**common.to_hf(cfg), 'hidden_act': 'silu', 'use_sliding_window': False}


def tensors(cfg: ModelConfig) -> tuple[common.Layout, common.Layout]:
  outer, layer = common.llama_tensors(cfg)
  H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  layer.update(common.in_layers({
      'bq_HxE': common.Tensor('self_attn.q_proj.bias', (H * E,)),
      'bk_KxE': common.Tensor('self_attn.k_proj.bias', (K * E,)),
      'bv_KxE': common.Tensor('self_attn.v_proj.bias', (K * E,)),
  }))
  return outer, layer
