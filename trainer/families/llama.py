"""Llama 1-3.x (incl. tied embeddings, as SmolLM2 and Llama 3.2 have): salt's base block."""

from typing import Any

from trainer.families import common
from trainer.model import ModelConfig

MODEL_TYPE = 'llama'
ARCHITECTURE = 'LlamaForCausalLM'


def from_hf(hf: dict) -> dict[str, Any]:
  common.refuse(hf, [
      ('attention_bias', hf.get('attention_bias', False), "salt's Llama has no attention bias (Qwen2's is q/k/v)"),
      ('mlp_bias', hf.get('mlp_bias', False), "salt's MLP has no bias"),
      ('hidden_act', hf.get('hidden_act', 'silu') not in ('silu', 'swish'), "Llama's MLP is SwiGLU (silu)"),
  ])
  return dict(family=MODEL_TYPE, **common.sizes(hf), **common.rope(hf))


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
  return {**common.to_hf(cfg), 'hidden_act': 'silu', 'attention_bias': False, 'mlp_bias': False}


tensors = common.llama_tensors
