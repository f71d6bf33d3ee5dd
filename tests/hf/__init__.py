"""The Hugging Face tier: salt against transformers itself, for each family salt imports.

Tiny random models of each family (Llama, as Llama 2, Llama 3 and SmolLM2 ship it;
Mistral; Qwen2; Gemma 3), built and saved by transformers with tokenizers of their kinds,
go through `salt import-teacher`, `salt prepare --tokenizer`, `salt score` and `salt
export`; each result is held to what transformers computes from the same files: logits,
token ids, scores. Its tests run where torch and transformers are installed (`make
test-hf` builds that environment, .venv-hf) and are skipped elsewhere.
"""

import importlib.util

import pytest

# The tiny models of tests/hf/families.py, and the class transformers runs each as.
FAMILIES = {'llama2': 'LlamaForCausalLM', 'llama3': 'LlamaForCausalLM', 'smollm2': 'LlamaForCausalLM',
            'mistral': 'MistralForCausalLM', 'qwen2': 'Qwen2ForCausalLM', 'gemma3': 'Gemma3ForCausalLM'}
SEQ_LEN = 32  # the models' max_position_embeddings: the imported teacher's sequence length
RECORD_TOKENS = 80  # salt prepare's records: one spans three of the teacher's windows
requires_hf = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ('torch', 'transformers')),
    reason='the Hugging Face tier needs torch and transformers (make test-hf)')
