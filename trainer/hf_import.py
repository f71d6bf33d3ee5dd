"""`salt import-teacher`: an open Hugging Face model of a family salt knows as a salt teacher.

Reads a model directory as Hugging Face writes it (config.json; model.safetensors, or
the shards that model.safetensors.index.json lists; its tokenizer) and writes
  OUT/checkpoints/0    a salt checkpoint of the parameters, for `salt.teacher` and `salt score`
  OUT/config.json      its resolved salt config
  OUT/<tokenizer>      the tokenizer's files, whose identity the config records, so that
                       the student's data is prepared with the teacher's tokenizer.

The families (Llama, Mistral, Qwen2, Gemma 3) and their tensor layouts are in
trainer/families. Tensors are read one at a time straight into the checkpoint's
float32 arrays, so the model sits in host memory once.
"""

import contextlib
import json
from pathlib import Path
from typing import Any

# Registers bfloat16 with NumPy: safetensors' NumPy reader returns bf16 tensors as it.
import ml_dtypes  # noqa: F401
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from trainer import checkpoint, families, step
from trainer.config import defaults, validate
from trainer.errors import UserError
from trainer.families.common import CONFIG, Tensor, size
from trainer.model import ModelConfig
from trainer.tokenizer import Tokenizer, load as load_tokenizer
from trainer.train import versions

WEIGHTS = 'model.safetensors'
WEIGHTS_INDEX = 'model.safetensors.index.json'
FLOAT_DTYPES = ('F32', 'F16', 'BF16')
# A buffer some exports carry beside the weights; salt computes it from the config.
IGNORED_SUFFIX = '.rotary_emb.inv_freq'


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
  """salt's `model` config for a Hugging Face config.json of a family salt knows.

  Raises UserError naming the field of an architecture or option salt does not implement.
  """
  return families.for_config(hf).from_hf(hf)


def _tokenizer(model_dir: Path, given: Path | None, vocab_size: int) -> Tokenizer:
  """The tokenizer to ship with the teacher: `given`, or the model directory's. A
  vocabulary padded past the tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens) is
  accepted: its padding rows are never targets."""
  found = load_tokenizer(given or model_dir)
  if found.vocab_size > vocab_size:
    raise UserError(f'the tokenizer {found.files[0]} of {given or model_dir} has {found.vocab_size} tokens but '
                    f'{CONFIG} vocab_size={vocab_size}; a teacher and its student must share one vocabulary: give '
                    'the tokenizer of this model with --tokenizer')
  return found


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
      raise UserError(f'{self.model_dir} holds tensor {extra[0]!r}{_more(extra)}, which a model of this '
                      f'{CONFIG} does not have')
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


def _read_params(tensors: _Tensors, cfg: ModelConfig, shapes: dict) -> dict:
  """The parameters as a pure dict of float32 arrays (`shapes`: the model's, same structure)."""
  outer, layer = families.FAMILIES[cfg.family].tensors(cfg)
  expected = {t.name: t.shape for t in outer.values()}
  expected.update({t.name.format(i=i): t.shape for t in layer.values() for i in range(cfg.n_layers)})
  # Tied models may still carry lm_head.weight, a copy of the embedding.
  tensors.check(expected, optional={'lm_head.weight'} if cfg.tie_embeddings else set())

  def to_salt(t: Tensor, name: str, shape: tuple[int, ...]) -> np.ndarray:
    w = tensors.read(name).astype(np.float32)
    return (w.T if t.transposed else w).reshape(shape)

  params = {key: np.ascontiguousarray(to_salt(t, t.name, shapes[key].shape)) for key, t in outer.items()}
  params['layers'] = {}
  for key, t in layer.items():
    stacked = np.empty(shapes['layers'][key].shape, np.float32)
    for i in range(cfg.n_layers):
      stacked[i] = to_salt(t, t.name.format(i=i), stacked.shape[1:])
    params['layers'][key] = stacked
  return params


def import_teacher(model_dir: Path, output: Path, *, tokenizer: Path | None = None) -> dict:
  """Imports the Hugging Face model in `model_dir` into the new directory `output`.

  Returns a summary: the checkpoint's path, the tokenizer's and the resolved config.
  Raises UserError for a family or option salt does not implement, a tokenizer it
  cannot read or of another vocabulary, missing files or tensors, or tensors of the
  wrong shape.
  """
  model_dir, output = Path(model_dir), Path(output)
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    raise UserError(f'{output} is not empty; import into a new directory')
  hf = read_config(model_dir)
  config = defaults()
  config.model.update(model_settings(hf))
  tok = _tokenizer(model_dir, tokenizer, config.model.vocab_size)
  config.data.update(seq_len=min(config.data.seq_len, size(hf, 'max_position_embeddings', config.data.seq_len)),
                     tokenizer_sha256=tok.sha256)
  validate(config, device_count=1)  # the model's settings; the mesh is whichever run loads the teacher
  cfg = ModelConfig(**config.model)
  _, params = step.abstract_model(cfg)
  tensors = _Tensors(model_dir)
  try:
    nnx.replace_by_pure_dict(params, _read_params(tensors, cfg, nnx.to_pure_dict(params)))
  finally:
    tensors.close()

  output.mkdir(parents=True, exist_ok=True)
  tok.copy_to(output)
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
  return {'checkpoint': str(path / '0'), 'tokenizer': str(output / tok.files[0]), 'config': resolved}
