"""`salt import-teacher`: an open Llama-architecture model from Hugging Face as a salt teacher.

Reads a model directory as Hugging Face writes it (config.json; model.safetensors, or
the shards that model.safetensors.index.json lists; tokenizer.model) and writes
  OUT/checkpoints/0    a salt checkpoint of the parameters, for `salt.teacher` and `salt score`
  OUT/config.json      its resolved salt config
  OUT/tokenizer.model  the sentencepiece model, whose identity the config records, so that
                       the student's data is prepared with the teacher's tokenizer.

Llama and Mistral store q_proj and k_proj in the rotate-half order that
`trainer.model.rotary` uses, so each weight maps by a transpose and a reshape alone
(nn.Linear weights are [out, in]):
  q_proj [H*E, D] -> wq [D, H, E]      k_proj, v_proj [K*E, D] -> wk, wv [D, K, E]
  o_proj [D, H*E] -> wo [H, E, D]      gate_proj, up_proj [F, D] -> [D, F]
  down_proj [D, F] -> [F, D]           lm_head [V, D] -> unembed [D, V]
Tensors are read one at a time straight into the checkpoint's float32 arrays, so the
model sits in host memory once.
"""

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

# Registers bfloat16 with NumPy: safetensors' NumPy reader returns bf16 tensors as it.
import ml_dtypes  # noqa: F401
import numpy as np
import sentencepiece as spm
from flax import nnx
from safetensors import SafetensorError, safe_open

from trainer import checkpoint, step
from trainer.config import defaults, validate
from trainer.errors import UserError
from trainer.model import ModelConfig
from trainer.prepare import TOKENIZER, tokenizer_sha256
from trainer.train import versions

CONFIG = 'config.json'
WEIGHTS = 'model.safetensors'
WEIGHTS_INDEX = 'model.safetensors.index.json'
ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM'}
FLOAT_DTYPES = ('F32', 'F16', 'BF16')
# A buffer some exports carry beside the weights; salt computes it from the config.
IGNORED_SUFFIX = '.rotary_emb.inv_freq'

# salt parameter -> (Hugging Face tensor name, its [out, in] shape, whether salt holds it
# transposed and reshaped: every nn.Linear weight; norms and the embedding map as they are).
Layout = dict[str, tuple[str, tuple[int, ...], bool]]


def read_config(model_dir: Path) -> dict:
  """The model's config.json. Raises UserError when it is missing or not JSON."""
  path = Path(model_dir) / CONFIG
  if not path.is_file():
    raise UserError(f'{model_dir} has no {CONFIG}; give the directory of a Hugging Face model')
  try:
    hf = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not JSON: {e}') from None
  if not isinstance(hf, dict):
    raise UserError(f'{path} holds a JSON {type(hf).__name__}, not an object of settings')
  return hf


def model_settings(hf: dict) -> dict[str, Any]:
  """salt's `model` config for a Hugging Face Llama or Mistral config.json.

  Raises UserError naming the field of an architecture or option salt does not implement.
  """
  _check_supported(hf)
  d_model, n_heads = _size(hf, 'hidden_size'), _size(hf, 'num_attention_heads')
  return dict(
      vocab_size=_size(hf, 'vocab_size'), d_model=d_model, n_layers=_size(hf, 'num_hidden_layers'),
      n_heads=n_heads, n_kv_heads=_size(hf, 'num_key_value_heads', n_heads),
      head_dim=_size(hf, 'head_dim', d_model // n_heads), d_ff=_size(hf, 'intermediate_size'),
      norm_eps=_positive(hf, 'rms_norm_eps', 1e-6), tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      **_rope_settings(hf))


def _size(hf: dict, key: str, default: int | None = None, where: str = CONFIG) -> int:
  """A positive integer field of config.json (`default` where it is absent)."""
  value = _field(hf, key, where) if default is None else hf.get(key) or default
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise UserError(f'{where} {key}={value!r} must be a positive integer')
  return value


def _positive(hf: dict, key: str, default: float | None = None, where: str = CONFIG) -> float:
  """A positive finite number field of config.json (`default` where it is absent; a
  null is not absent)."""
  value = _field(hf, key, where) if default is None else hf.get(key, default)
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
    raise UserError(f'{where} {key}={value!r} must be a positive number')
  return float(value)


def _field(hf: dict, key: str, where: str = CONFIG) -> Any:
  if hf.get(key) is None:
    raise UserError(f'{where} has no {key!r}')
  return hf[key]


def _check_supported(hf: dict) -> None:
  model_type = hf.get('model_type')
  if model_type not in ARCHITECTURES:
    raise UserError(f'{CONFIG} model_type={model_type!r}: salt imports the Llama architecture '
                    f'(model_type {" or ".join(map(repr, ARCHITECTURES))}) only')
  expected = ARCHITECTURES[model_type]
  architectures = hf.get('architectures') or [expected]
  if [a.lower() for a in architectures] != [expected.lower()]:
    raise UserError(f'{CONFIG} architectures={architectures}: salt imports {expected} only')
  unsupported = [
      ('sliding_window', hf.get('sliding_window') is not None, 'salt attends to the whole context'),
      ('attention_bias', hf.get('attention_bias', False), "salt's attention projections have no bias"),
      ('mlp_bias', hf.get('mlp_bias', False), "salt's MLP has no bias"),
      ('hidden_act', hf.get('hidden_act', 'silu') not in ('silu', 'swish'), "salt's MLP is SwiGLU (silu)"),
  ]
  for key, present, why in unsupported:
    if present:
      raise UserError(f'{CONFIG} {key}={hf[key]!r} is not supported: {why}')


def _rope_settings(hf: dict) -> dict[str, Any]:
  """rope_theta and the scaling, from transformers 4's rope_theta and rope_scaling or
  transformers 5's rope_parameters."""
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  kind = rope.get('rope_type', rope.get('type', 'default'))
  where = f'{CONFIG} {"rope_parameters" if "rope_parameters" in hf else "rope_scaling"}'
  theta = _positive(rope, 'rope_theta', where=where) if 'rope_theta' in rope else _positive(hf, 'rope_theta', 10000.0)
  settings = dict(rope_theta=theta)
  if kind == 'linear':
    settings.update(rope_scaling='linear', rope_scaling_factor=_positive(rope, 'factor', where=where))
  elif kind == 'llama3':
    settings.update(
        rope_scaling='llama3', rope_scaling_factor=_positive(rope, 'factor', where=where),
        rope_low_freq_factor=_positive(rope, 'low_freq_factor', where=where),
        rope_high_freq_factor=_positive(rope, 'high_freq_factor', where=where),
        rope_original_max_positions=_size(rope, 'original_max_position_embeddings', where=where))
  elif kind != 'default':
    raise UserError(f'{where} type {kind!r} is not supported: salt implements default, linear and llama3 RoPE')
  return settings


def _tokenizer(model_dir: Path, given: Path | None, vocab_size: int) -> Path:
  """The sentencepiece model to ship with the teacher: `given`, or the model directory's."""
  path = Path(given) if given else model_dir / TOKENIZER
  if not path.is_file():
    if given:
      raise UserError(f'--tokenizer {str(given)!r} does not exist')
    found = next((n for n in ('tokenizer.json', 'tokenizer_config.json') if (model_dir / n).is_file()), None)
    what = f'only {found}, a Hugging Face tokenizer that is not sentencepiece' if found else 'no tokenizer'
    raise UserError(f'{model_dir} has {what}; salt tokenizes with sentencepiece and needs {TOKENIZER}: '
                    'give a sentencepiece model of this vocabulary with --tokenizer')
  try:
    pieces = spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
  except (RuntimeError, OSError):
    raise UserError(f'{path} is not a sentencepiece model; salt tokenizes with sentencepiece only') from None
  if pieces != vocab_size:
    raise UserError(f'{path} has {pieces} tokens but {CONFIG} vocab_size={vocab_size}; a teacher and its '
                    'student must share one vocabulary')
  return path


class _Tensors:
  """The tensors of a model's safetensors files by name; the files stay open until close()."""

  def __init__(self, model_dir: Path):
    self.model_dir = model_dir
    self.files = contextlib.ExitStack()
    self.where = {}  # tensor name -> (file name, open file)
    for path in _weight_files(model_dir):
      try:
        handle = self.files.enter_context(safe_open(str(path), framework='numpy'))
      except (SafetensorError, OSError) as e:
        self.close()
        raise UserError(f'{path} is not a readable safetensors file: {e}') from None
      self.where.update(dict.fromkeys(handle.keys(), (path.name, handle)))

  def check(self, expected: dict[str, tuple[int, ...]], optional: set[str]) -> None:
    """Raises UserError unless the files hold exactly these float tensors in these shapes."""
    missing = [name for name in expected if name not in self.where]
    if missing:
      raise UserError(f'{self.model_dir} has no tensor {missing[0]!r}{_more(missing)}, which {CONFIG} implies')
    extra = sorted(n for n in self.where.keys() - expected.keys() - optional if not n.endswith(IGNORED_SUFFIX))
    if extra:
      raise UserError(f'{self.model_dir} holds tensor {extra[0]!r}{_more(extra)}, which a Llama model of '
                      f'this {CONFIG} does not have')
    for name, shape in expected.items():
      file, handle = self.where[name]
      tensor = handle.get_slice(name)
      if tensor.get_dtype() not in FLOAT_DTYPES:
        raise UserError(f'{file}: tensor {name!r} is {tensor.get_dtype()}; salt imports float weights '
                        f'({", ".join(FLOAT_DTYPES)}) only')
      if tuple(tensor.get_shape()) != shape:
        raise UserError(f'{file}: tensor {name!r} has shape {tuple(tensor.get_shape())}; {CONFIG} implies {shape}')

  def read(self, name: str) -> np.ndarray:
    return self.where[name][1].get_tensor(name)

  def close(self) -> None:
    self.files.close()


def _more(names: list[str]) -> str:
  return f' (and {len(names) - 1} more)' if len(names) > 1 else ''


def _weight_files(model_dir: Path) -> list[Path]:
  index = model_dir / WEIGHTS_INDEX
  if index.is_file():
    try:
      names = sorted(set(json.loads(index.read_text())['weight_map'].values()))
    except (json.JSONDecodeError, KeyError, AttributeError):
      raise UserError(f'{index} is not a safetensors index (JSON with a weight_map)') from None
    missing = [n for n in names if not (model_dir / n).is_file()]
    if missing:
      raise UserError(f'{index} lists {missing[0]}{_more(missing)}, which {model_dir} does not hold')
    return [model_dir / n for n in names]
  if (model_dir / WEIGHTS).is_file():
    return [model_dir / WEIGHTS]
  raise UserError(f'{model_dir} has neither {WEIGHTS} nor {WEIGHTS_INDEX}; salt imports safetensors weights only')


def layouts(cfg: ModelConfig) -> tuple[Layout, Layout]:
  """The parameters outside the layers, and those of layer {i}, by salt name."""
  D, H, K, E, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  outer = {'embed_VxD': ('model.embed_tokens.weight', (V, D), False), 'final_norm': ('model.norm.weight', (D,), False)}
  if not cfg.tie_embeddings:
    outer['unembed_DxV'] = ('lm_head.weight', (V, D), True)
  layer = {
      'attn_norm': ('input_layernorm.weight', (D,), False),
      'wq_DxHxE': ('self_attn.q_proj.weight', (H * E, D), True),
      'wk_DxKxE': ('self_attn.k_proj.weight', (K * E, D), True),
      'wv_DxKxE': ('self_attn.v_proj.weight', (K * E, D), True),
      'wo_HxExD': ('self_attn.o_proj.weight', (D, H * E), True),
      'mlp_norm': ('post_attention_layernorm.weight', (D,), False),
      'w_gate_DxF': ('mlp.gate_proj.weight', (F, D), True),
      'w_up_DxF': ('mlp.up_proj.weight', (F, D), True),
      'w_down_FxD': ('mlp.down_proj.weight', (D, F), True),
  }
  return outer, {key: ('model.layers.{i}.' + name, shape, t) for key, (name, shape, t) in layer.items()}


def _read_params(tensors: _Tensors, cfg: ModelConfig, shapes: dict) -> dict:
  """The parameters as a pure dict of float32 arrays (`shapes`: the model's, same structure)."""
  outer, layer = layouts(cfg)
  expected = {name: shape for name, shape, _ in outer.values()}
  expected.update({name.format(i=i): shape for name, shape, _ in layer.values() for i in range(cfg.n_layers)})
  # Tied models may still carry lm_head.weight, a copy of the embedding.
  tensors.check(expected, optional={'lm_head.weight'} if cfg.tie_embeddings else set())

  def to_salt(name: str, transposed: bool, shape: tuple[int, ...]) -> np.ndarray:
    w = tensors.read(name)
    return w.T.reshape(shape) if transposed else w

  params = {key: np.ascontiguousarray(to_salt(name, t, shapes[key].shape), np.float32)
            for key, (name, _, t) in outer.items()}
  params['layers'] = {}
  for key, (name, _, t) in layer.items():
    stacked = np.empty(shapes['layers'][key].shape, np.float32)
    for i in range(cfg.n_layers):
      stacked[i] = to_salt(name.format(i=i), t, stacked.shape[1:])
    params['layers'][key] = stacked
  return params


def import_teacher(model_dir: Path, output: Path, *, tokenizer: Path | None = None) -> dict:
  """Imports the Hugging Face model in `model_dir` into the new directory `output`.

  Returns a summary: the checkpoint's path, the tokenizer's and the resolved config.
  Raises UserError for an architecture or option salt does not implement, a tokenizer
  that is not sentencepiece, missing files or tensors, or tensors of the wrong shape.
  """
  model_dir, output = Path(model_dir), Path(output)
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    raise UserError(f'{output} is not empty; import into a new directory')
  hf = read_config(model_dir)
  config = defaults()
  config.model.update(model_settings(hf))
  sp_model = _tokenizer(model_dir, tokenizer, config.model.vocab_size)
  config.data.update(seq_len=min(config.data.seq_len, _size(hf, 'max_position_embeddings', config.data.seq_len)),
                     tokenizer_sha256=tokenizer_sha256(sp_model))
  validate(config, device_count=1)  # the model's settings; the mesh is whichever run loads the teacher
  cfg = ModelConfig(**config.model)
  _, params = step.abstract_model(cfg)
  tensors = _Tensors(model_dir)
  try:
    nnx.replace_by_pure_dict(params, _read_params(tensors, cfg, nnx.to_pure_dict(params)))
  finally:
    tensors.close()

  output.mkdir(parents=True, exist_ok=True)
  shutil.copyfile(sp_model, output / TOKENIZER)
  resolved = config.to_dict()
  meta = {'config': resolved, 'versions': versions(),
          'imported_from': {'directory': str(model_dir.resolve()), 'model_type': hf['model_type'],
                            'architectures': hf.get('architectures')}}
  (output / 'config.json').write_text(json.dumps(meta, indent=2))
  path = output / 'checkpoints'
  saver = checkpoint.Checkpoints(path, every_steps=1, max_to_keep=1, async_save=False)
  try:
    # No optimizer state: a teacher is only read.
    saver.save(0, step.TrainState(step=np.int32(0), params=params, opt_state=()), meta)
    saver.wait()
  finally:
    saver.close()
  return {'checkpoint': str(path / '0'), 'tokenizer': str(output / TOKENIZER), 'config': resolved}
