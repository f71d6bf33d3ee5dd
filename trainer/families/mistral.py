"""Mistral: Llama with sliding-window attention on every layer (v0.1's 4,096 tokens;
later versions set none)."""

from typing import Any

from trainer.families import common
from trainer.model import ModelConfig

MODEL_TYPE = 'mistral'
ARCHITECTURE = 'MistralForCausalLM'


def from_hf(hf: dict) -> dict[str, Any]:
  common.refuse(hf, [
      ('hidden_act', hf.get('hidden_act', 'silu') not in ('silu', 'swish'), "Mistral's MLP is SwiGLU (silu)"),
  ])
  window = common.size(hf, 'sliding_window') if hf.get('sliding_window') is not None else 0
  return dict(family=MODEL_TYPE, sliding_window=window, **common.sizes(hf), **common.rope(hf))


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
  return {**common.to_hf(cfg), 'hidden_act': 'silu', 'sliding_window': cfg.sliding_window or None}


tensors = common.llama_tensors
