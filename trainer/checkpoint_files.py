"""What a salt checkpoint is made of, read back outside training: its config, its
parameters and the tokenizer it was trained with (for `salt export` and `salt sample`)."""

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from trainer import checkpoint, step
from trainer.errors import UserError
from trainer.model import ModelConfig
from trainer.prepare import read_manifest
from trainer.tokenizer import Tokenizer, load as load_tokenizer


def read_checkpoint(path: Path) -> tuple[dict, dict]:
  """The checkpoint's resolved config, and its parameters (only) on the host as NumPy
  arrays, by salt name."""
  path = Path(path)
  if not path.name.isdigit() or not (path / 'state').is_dir():
    raise UserError(f'{path} is not a salt checkpoint (RUN/checkpoints/STEP)')
  config = checkpoint.read_meta(path, named=str(path))['config']
  _, target = step.abstract_model(ModelConfig(**config['model']))
  restore_args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray), target)
  try:
    restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
        checkpoint.absolute(path / 'state'),
        args=ocp.args.PyTreeRestore(item={'params': target}, partial_restore=True,
                                    restore_args={'params': restore_args}))
  except Exception as e:  # Orbax and TensorStore raise many types for unreadable data
    raise UserError(f'{path}: cannot read its parameters ({type(e).__name__})') from None
  return config, nnx.to_pure_dict(restored['params'])


def checkpoint_tokenizer(path: Path, config: dict, given: Path | None) -> Tokenizer:
  """The tokenizer the checkpoint was trained with: --tokenizer, the imported teacher's
  beside its checkpoints, or its data's; checked against the recorded identity."""
  want = config['data']['tokenizer_sha256']
  candidates = [Path(given)] if given else [Path(path).parent.parent]
  data_dir = Path(config['data'].get('path') or '')
  if not given and (data_dir / 'manifest.json').is_file():
    candidates.append(data_dir / read_manifest(data_dir)['tokenizer'])
  for candidate in candidates:
    try:
      found = load_tokenizer(candidate)
    except UserError:
      if given:
        raise
      continue
    if found.sha256 == want:
      return found
  if given:
    raise UserError(f'--tokenizer {str(given)!r} is not the tokenizer the checkpoint was trained with '
                    f'(sha256 {want[:12]}...)')
  raise UserError(f'the tokenizer of {path} (sha256 {want[:12]}...) is in none of {", ".join(map(str, candidates))}; '
                  'give it with --tokenizer')
