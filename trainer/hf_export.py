"""`salt export`: a salt checkpoint as a Hugging Face model of its family, for the field's tools.

    salt export RUN/checkpoints/STEP OUT
    lm_eval --model hf --model_args pretrained=OUT --tasks ...     (or vLLM: LLM(model=OUT))

OUT holds config.json (the family's architecture: LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM or Gemma3ForCausalLM, from model.family), the weights as safetensors
(sharded with model.safetensors.index.json beyond --max-shard-gb), and the tokenizer's
files with a tokenizer_config.json that adds no BOS token: salt trains documents that
end with EOS and never begin with BOS. The weights are the layout `salt import-teacher`
reads (trainer/families), so export then import gives back the same parameters.
"""

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from trainer import families
from trainer.checkpoint_files import checkpoint_tokenizer, read_checkpoint
from trainer.errors import UserError
from trainer.hf_import import WEIGHTS, WEIGHTS_INDEX
from trainer.model import ModelConfig
from trainer.tokenizer import Tokenizer

DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16}


def hf_config(cfg: ModelConfig, seq_len: int, tok: Tokenizer, dtype: str) -> dict:
  """config.json of the model's family, with salt's settings."""
  family = families.for_model(cfg)
  return {'architectures': [family.ARCHITECTURE], 'model_type': family.MODEL_TYPE, **family.to_hf(cfg),
          'max_position_embeddings': seq_len, 'torch_dtype': dtype, **_special_ids(tok)}


def _special_ids(tok: Tokenizer) -> dict[str, int]:
  ids = {'bos_token_id': tok.bos_id, 'eos_token_id': tok.eos_id, 'pad_token_id': tok.pad_id}
  return {k: i for k, i in ids.items() if i is not None}


def _tokenizer_config(tok: Tokenizer, cfg: ModelConfig, seq_len: int) -> dict:
  """tokenizer_config.json: the tokenizer's class, its special tokens, and no BOS added."""
  if tok.kind == 'sentencepiece':
    kind = {'tokenizer_class': 'GemmaTokenizer' if cfg.family == 'gemma3_text' else 'LlamaTokenizer',
            'legacy': False}
  else:
    kind = {'tokenizer_class': 'PreTrainedTokenizerFast'}
  return {**kind, 'add_bos_token': False, 'add_eos_token': False, 'model_max_length': seq_len,
          **{k.replace('_id', ''): tok.id_to_token(i) for k, i in _special_ids(tok).items()}}


def _without_added_tokens(post_processor: dict | None) -> dict | None:
  """A tokenizer.json's post-processor less the templates that add BOS (or CLS/SEP):
  transformers' fast tokenizers apply them whatever add_bos_token says."""
  adds = ('TemplateProcessing', 'BertProcessing', 'RobertaProcessing')
  if not post_processor or post_processor.get('type') in adds:
    return None
  if post_processor.get('type') == 'Sequence':
    return {**post_processor, 'processors': [p for p in post_processor['processors'] if p.get('type') not in adds]}
  return post_processor


def _write_tokenizer(tok: Tokenizer, cfg: ModelConfig, seq_len: int, output: Path) -> None:
  tok.copy_to(output)
  if tok.kind == 'huggingface':
    # The post-processor is not part of the tokenizer's identity: the export still imports as the same one.
    spec = json.loads((output / 'tokenizer.json').read_text(encoding='utf-8'))
    spec['post_processor'] = _without_added_tokens(spec.get('post_processor'))
    (output / 'tokenizer.json').write_text(json.dumps(spec, ensure_ascii=False), encoding='utf-8')
  (output / 'tokenizer_config.json').write_text(json.dumps(_tokenizer_config(tok, cfg, seq_len), indent=2))


def _tensors(params: dict, cfg: ModelConfig, dtype) -> dict[str, np.ndarray]:
  """Hugging Face tensors by name, in its [out, in] layout."""
  outer, layer = families.FAMILIES[cfg.family].tensors(cfg)

  def to_hf(x: np.ndarray, t) -> np.ndarray:
    return np.ascontiguousarray((x.reshape(t.shape[::-1]).T if t.transposed else x.reshape(t.shape)).astype(dtype))

  tensors = {t.name: to_hf(params[key], t) for key, t in outer.items()}
  for key, t in layer.items():
    tensors.update({t.name.format(i=i): to_hf(params['layers'][key][i], t) for i in range(cfg.n_layers)})
  return tensors


def _write_weights(tensors: dict[str, np.ndarray], output: Path, max_shard_bytes: int) -> list[str]:
  """One safetensors file, or shards of at most max_shard_bytes with an index; the file names."""
  shards, current, size = [], {}, 0
  for name, x in tensors.items():
    if current and size + x.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name], size = x, size + x.nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], output / WEIGHTS, metadata={'format': 'pt'})
    return [WEIGHTS]
  files = [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
  for file, shard in zip(files, shards):
    save_file(shard, output / file, metadata={'format': 'pt'})
  index = {'metadata': {'total_size': sum(x.nbytes for x in tensors.values())},
           'weight_map': {name: file for file, shard in zip(files, shards) for name in shard}}
  (output / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))
  return files


def export(path: Path, output: Path, *, tokenizer: Path | None = None, dtype: str = 'float32',
           max_shard_gb: float = 5.0) -> dict:
  """Writes the checkpoint at `path` into the new directory `output` as a Hugging Face
  Llama model; returns a summary (files, parameters, dtype)."""
  path, output = Path(path), Path(output)
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    raise UserError(f'{output} is not empty; export into a new directory')
  if dtype not in DTYPES:
    raise UserError(f'--dtype {dtype!r} must be one of {", ".join(DTYPES)}')
  if not (math.isfinite(max_shard_gb) and max_shard_gb > 0):
    raise UserError(f'--max-shard-gb {max_shard_gb} must be a positive number of GB')
  config, params = read_checkpoint(path)
  cfg = ModelConfig(**config['model'])
  seq_len = config['data']['seq_len']
  tok = checkpoint_tokenizer(path, config, tokenizer)
  hf = hf_config(cfg, seq_len, tok, dtype)
  tensors = _tensors(params, cfg, DTYPES[dtype])

  output.mkdir(parents=True, exist_ok=True)
  files = _write_weights(tensors, output, int(max_shard_gb * 2**30))
  (output / 'config.json').write_text(json.dumps(hf, indent=2))
  _write_tokenizer(tok, cfg, seq_len, output)
  (output / 'generation_config.json').write_text(json.dumps(
      {k: i for k, i in _special_ids(tok).items() if k != 'pad_token_id'}, indent=2))
  return {'output': str(output), 'files': files, 'parameters': int(sum(x.size for x in tensors.values())),
          'dtype': dtype}
