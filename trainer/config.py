"""The config schema, loading a config file with command-line overrides, and validation.

A config file is a Python file with `get_config(arg=None)` that starts from
`defaults()` and changes what it needs. Every key a run can read exists in
`defaults()`, so an unknown key on the command line is an error, not a silent no-op.
"""

import ast
import dataclasses
import difflib
import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from kernels import IMPLS, attention
from trainer import families
from trainer.data import SELECTION_RULES
from trainer.errors import UserError
from trainer.model import ModelConfig

MESH_AXES = ('data', 'fsdp', 'tensor')
DECAY_SCHEDULES = ('cosine', 'linear')
KD_SCHEDULES = ('constant', 'linear', 'linear_ratio')


def defaults() -> ml_collections.ConfigDict:
  """Every key of a salt config, with the values of a small model."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000

  c.model = dataclasses.asdict(ModelConfig())  # its keys, defaults and their meaning: trainer/model.py
  c.data = dict(
      path='',  # a directory written by `salt prepare`; '' = embedded Shakespeare
      seq_len=1024,
      global_batch_size=32,
      # The global batch's gradient is summed over this many parts, one at a time: the
      # same update, with 1/micro_batches of the activations (a large batch on few devices).
      micro_batches=1,
      shuffle_seed=0,
      workers=0,  # loader worker processes per host; 0 reads in threads of the trainer
      # Hash every shard against the manifest when the data is opened (a full read, in
      # parallel); False checks sizes only, for a corpus too large to read at every start.
      verify_hashes=True,
      # The identity of the tokenizer the model is trained with (prepare.tokenizer_sha256:
      # a hash of its pieces and encoding); '' adopts the data's, and the resolved config records it.
      tokenizer_sha256='',
      selection=dict(
          scores='',  # a .npy of one float per training record (NaN: unscored); '' = no selection
          # 'top': the keep_fraction highest scores; 'band': ranks in [band_low, band_high).
          # 'top' keeps the highest scores, as SALT_DS's rule does: a high score is a high
          # loss on tokens the SLM ranks in its top k, i.e. hard yet learnable text; noise
          # the SLM cannot predict at all scores nothing and is never kept. The half kept by
          # default is our choice: the paper's fraction is not in what we could read.
          rule='top',
          keep_fraction=0.5,
          band_low=0.0,
          band_high=1.0,
      ),
  )
  c.optim = dict(
      lr=3e-4,
      min_lr_ratio=0.1,
      warmup_steps=100,
      decay='cosine',  # one of DECAY_SCHEDULES
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      clip_norm=1.0,
  )
  c.attention = dict(
      # One of kernels.attention.IMPLS: xla (the reference, builds [B, H, L, L] scores),
      # cudnn, pallas_gpu, splash, or auto: per device, the fastest measured that keeps
      # documents apart (kernels.attention.FASTEST).
      impl='auto',
  )
  c.loss = dict(
      # One of kernels.IMPLS: xla (vocabulary-chunked reference), pallas (fused TPU
      # kernels), token_chunks (tokens in chunks, shaped for GPUs), auto (per device,
      # the fastest measured: kernels.losses.FASTEST).
      impl='auto',
      vocab_chunk=8192,  # the reference's vocabulary chunk
      block_tokens=0,  # the Pallas kernels' block, tokens x vocabulary columns (0: the kernels' default)
      block_vocab=0,
      chunk_tokens=0,  # token_chunks' chunk (0: the largest power of two within its memory budget)
  )
  # Stage 1 is steps [0, salt.n_kd): it distills from `teacher` when one is set and
  # reads only the records data.selection keeps when scores are given. Stage 2 is
  # plain next-token training on all the data.
  c.salt = dict(
      teacher='',  # a salt checkpoint of the small model (RUN/checkpoints/STEP); '' = none
      n_kd=0,
      weight=0.5,  # w at step 0 in loss = (1 - w) CE + w KD
      schedule='constant',  # one of KD_SCHEDULES; constant is the step transition the paper names SALT
      tau=1.0,
      tau_squared=False,  # scale KD by tau**2, keeping its gradient's size as tau changes
      teacher_top_k=0,  # keep the teacher's top k tokens, renormalised (0: all)
  )
  # Mesh axis sizes; -1 takes the devices the other axes leave. dcn_data: how many
  # slices (TPU multi-slice, joined over the data-centre network) the data axis spans;
  # `data` is the whole axis, so each slice holds data / dcn_data of it.
  c.mesh = dict(data=-1, fsdp=1, tensor=1, dcn_data=1)
  # Logical axis -> comma-separated mesh axes ('' = replicated).
  c.sharding = dict(
      batch='data,fsdp',
      embed='fsdp',
      vocab='tensor',
      heads='tensor',
      kv_heads='tensor',
      mlp='tensor',
      head_dim='',
      layers='',
      norm='',
  )
  c.checkpoint = dict(
      every_steps=500,
      max_to_keep=3,  # the most recent ones; older ones are deleted...
      keep_every_steps=0,  # ...except multiples of this (0: none), kept for good
      async_save=True,  # training goes on while a checkpoint is written
  )
  # A loss or gradient that is not finite: 'stop' the run (the last checkpoint is the
  # last good state) or 'skip' the batch, leaving the state as it was.
  c.nonfinite = 'stop'
  c.eval = dict(
      every_steps=200,
      batches=8,
      # Few-shot tasks scored beside the loss (trainer/tasks.py): task files (.jsonl),
      # comma-separated or a list, or the embedded corpus's (trainer/corpus.py TASKS); '' = none.
      tasks=ml_collections.FieldReference('', field_type=object),
      task_shots=0,  # demonstrations before each example
      task_separator='\n\n',  # between demonstrations, and before the example's context
      task_every_steps=0,  # 0: eval.every_steps
  )
  c.log = dict(every_steps=10)
  return c


def load(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """Loads `FILE[:ARG]` and applies `--config.KEY=VALUE` overrides.

  Raises:
    UserError: the file is missing or has no get_config, an override names an
      unknown key or gives a value of the wrong type.
  """
  path, _, arg = spec.partition(':')
  if not Path(path).is_file():
    raise UserError(f'config file {path!r} does not exist')
  module_spec = importlib.util.spec_from_file_location(f'salt_config_{Path(path).stem}', path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
      raise UserError(f'config file {path!r} defines no get_config(arg=None)')
    config = module.get_config(arg or None)
  except UserError:
    raise
  except Exception as e:  # the file is the user's code: whatever it raises is its message
    raise UserError(f'config file {spec!r} raised {type(e).__name__}: {e}') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f'get_config of {spec!r} returned a {type(config).__name__}, not the ConfigDict of '
                    'trainer.config.defaults()')
  unknown = _unknown_keys(config, defaults())
  if unknown:
    raise UserError(f'config file {path!r} sets unknown key {unknown[0]!r}')
  config.lock()
  for override in _split_overrides(overrides):
    _apply_override(config, *override)
  return config


def _unknown_keys(config, schema, prefix='') -> list[str]:
  unknown = []
  for key, value in config.items():
    name = prefix + key
    if key not in schema:
      unknown.append(name)
    elif isinstance(value, ml_collections.ConfigDict):
      unknown += _unknown_keys(value, schema[key], name + '.')
  return unknown


def _split_overrides(args: list[str]) -> list[tuple[str, str]]:
  """`--config.a.b=v` and `--config.a.b v` -> [('a.b', 'v')]."""
  pairs, i = [], 0
  while i < len(args):
    arg = args[i]
    if not arg.startswith('--config.'):
      raise UserError(f'unrecognized argument {arg!r}; overrides look like --config.optim.lr=3e-4')
    key, eq, value = arg[len('--config.'):].partition('=')
    if not eq:
      if i + 1 == len(args):
        raise UserError(f'override {arg!r} has no value; write {arg}=VALUE')
      value, i = args[i + 1], i + 1
    pairs.append((key, value))
    i += 1
  return pairs


def _apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  parts = key.split('.')
  node = config
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, options, n=1)
      hint = f"; did you mean {'.'.join(parts[:depth] + close[:1])!r}?" if close else ''
      raise UserError(f'unknown config key {key!r}{hint}')
    if depth < len(parts) - 1:
      node = node[part]
  leaf = parts[-1]
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise UserError(f'config key {key!r} is a group; set one of its keys: {", ".join(current.keys())}')
  value = _parse(text, type(current))
  try:
    node[leaf] = value
  except TypeError:
    raise UserError(
        f'config key {key!r} wants a {type(current).__name__}, got {text!r}') from None


def _parse(text: str, want: type) -> Any:
  if want is str:
    return text
  if want is bool:
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  # ConfigDict accepts an int for a float field but not the other way round.
  if want is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def mesh_shape(mesh: Mapping[str, int], device_count: int) -> dict[str, int]:
  """Resolves -1 in the mesh config against the device count."""
  sizes = {axis: mesh[axis] for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  fixed = math.prod(size for size in sizes.values() if size != -1)
  described = ' '.join(f'{a}={s}' for a, s in sizes.items())
  if len(free) > 1:
    raise UserError(f'mesh {described} has more than one axis set to -1; at most one may take the rest')
  if any(size == 0 or size < -1 for size in sizes.values()):
    raise UserError(f'mesh {described} has an axis size that is not positive or -1')
  if free:
    if device_count % fixed:
      raise UserError(
          f'mesh {described}: the fixed axes ({fixed} devices) do not divide the '
          f'{device_count} devices available')
    sizes[free[0]] = device_count // fixed
  elif fixed != device_count:
    raise UserError(
        f'mesh {described} needs {fixed} devices but {device_count} are available; '
        f'make the product {device_count} or set one axis to -1')
  return sizes


def _check_optimizer(o: ml_collections.ConfigDict) -> None:
  """Values that train without an error but learn nothing, or unlearn, are refused."""
  for key in ('lr', 'min_lr_ratio', 'b1', 'b2', 'eps', 'weight_decay', 'clip_norm'):
    _require(math.isfinite(o[key]), f'optim.{key}={o[key]} must be a finite number')
  _require(o.lr > 0, f'optim.lr={o.lr} must be positive')
  _require(0 <= o.min_lr_ratio <= 1, f'optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]')
  for key in ('b1', 'b2'):
    _require(0 <= o[key] < 1, f'optim.{key}={o[key]} must be in [0, 1)')
  _require(o.eps > 0, f'optim.eps={o.eps} must be positive')
  _require(o.weight_decay >= 0, f'optim.weight_decay={o.weight_decay} must be >= 0')
  _require(o.clip_norm > 0, f'optim.clip_norm={o.clip_norm} must be positive (a zero norm scales every update to 0)')


def validate(config: ml_collections.ConfigDict, device_count: int) -> None:
  """Checks what can be checked before building anything; raises UserError."""
  m, d, o = config.model, config.data, config.optim
  _require(config.total_steps > 0, f'total_steps={config.total_steps} must be positive')
  _require(o.decay in DECAY_SCHEDULES, f'optim.decay={o.decay!r} must be one of {DECAY_SCHEDULES}')
  for problem in ModelConfig(**m).problems()[:1]:
    raise UserError(problem)
  _require(m.family in families.FAMILIES, f'model.family={m.family!r} must be one of {tuple(families.FAMILIES)}')
  for key in ('log.every_steps', 'eval.every_steps', 'eval.batches'):
    group, name = key.split('.')
    _require(config[group][name] > 0, f'{key}={config[group][name]} must be positive')
  for key in ('task_shots', 'task_every_steps'):
    _require(config.eval[key] >= 0, f'eval.{key}={config.eval[key]} must be >= 0')
  _require(isinstance(config.eval.tasks, (str, list, tuple)),
           f'eval.tasks={config.eval.tasks!r} must be comma-separated task files or a list of them')
  _check_optimizer(o)
  _require(0 <= o.warmup_steps < config.total_steps,
           f'optim.warmup_steps={o.warmup_steps} must be in [0, total_steps={config.total_steps})')
  _require(config.nonfinite in ('stop', 'skip'), f"nonfinite={config.nonfinite!r} must be 'stop' or 'skip'")
  ck = config.checkpoint
  _require(ck.every_steps > 0, f'checkpoint.every_steps={ck.every_steps} must be positive')
  _require(ck.max_to_keep > 0, f'checkpoint.max_to_keep={ck.max_to_keep} must be positive')
  _require(ck.keep_every_steps >= 0, f'checkpoint.keep_every_steps={ck.keep_every_steps} must be >= 0')
  _require(config.attention.impl in attention.IMPLS,
           f'attention.impl={config.attention.impl!r} must be one of {attention.IMPLS}')
  ls = config.loss
  _require(ls.impl in IMPLS, f'loss.impl={ls.impl!r} must be one of {IMPLS}')
  _require(ls.vocab_chunk > 0, f'loss.vocab_chunk={ls.vocab_chunk} must be positive')
  for key in ('block_tokens', 'block_vocab', 'chunk_tokens'):
    _require(ls[key] >= 0 and not ls[key] & (ls[key] - 1),
             f'loss.{key}={ls[key]} must be a power of two (or 0 for the kernels\' default)')
  _require(d.seq_len > 0, f'data.seq_len={d.seq_len} must be positive')
  _require(d.workers >= 0, f'data.workers={d.workers} must be >= 0')
  sel, kd = d.selection, config.salt
  _require(kd.schedule in KD_SCHEDULES, f'salt.schedule={kd.schedule!r} must be one of {KD_SCHEDULES}')
  _require(0 <= kd.n_kd <= config.total_steps,
           f'salt.n_kd={kd.n_kd} must be in [0, total_steps={config.total_steps}]')
  _require(not kd.teacher or kd.n_kd, 'salt.teacher is set but salt.n_kd=0; set the number of distillation steps')
  _require(not sel.scores or kd.n_kd,
           'data.selection.scores is set but salt.n_kd=0; selection applies to stage 1, steps [0, salt.n_kd)')
  top = 0.999 if kd.schedule == 'linear_ratio' else 1.0
  _require(0 <= kd.weight <= top, f'salt.weight={kd.weight} must be in [0, {top}] for schedule {kd.schedule!r}')
  _require(kd.tau > 0, f'salt.tau={kd.tau} must be positive')
  _require(kd.teacher_top_k >= 0, f'salt.teacher_top_k={kd.teacher_top_k} must be >= 0 (0 keeps every token)')
  _require(sel.rule in SELECTION_RULES, f'data.selection.rule={sel.rule!r} must be one of {SELECTION_RULES}')
  _require(0 < sel.keep_fraction <= 1, f'data.selection.keep_fraction={sel.keep_fraction} must be in (0, 1]')
  _require(0 <= sel.band_low < sel.band_high <= 1,
           f'data.selection band [{sel.band_low}, {sel.band_high}) must satisfy 0 <= band_low < band_high <= 1')
  for logical, axes in config.sharding.items():
    for axis in filter(None, axes.split(',')):
      _require(axis in MESH_AXES,
               f'sharding.{logical}={axes!r} names mesh axis {axis!r}; mesh axes are {MESH_AXES}')
  sizes = mesh_shape(config.mesh, device_count)
  _require(config.mesh.dcn_data > 0 and sizes['data'] % config.mesh.dcn_data == 0,
           f'mesh.dcn_data={config.mesh.dcn_data} must be positive and divide the data axis ({sizes["data"]})')
  batch_axes = [a for a in config.sharding.batch.split(',') if a]
  shards = math.prod(sizes[a] for a in batch_axes)
  _require(d.global_batch_size > 0, f'data.global_batch_size={d.global_batch_size} must be positive')
  _require(d.micro_batches > 0, f'data.micro_batches={d.micro_batches} must be positive')
  _require(
      d.global_batch_size % (shards * d.micro_batches) == 0,
      f'data.global_batch_size={d.global_batch_size} does not divide over the batch axes '
      f'{"*".join(f"{a}={sizes[a]}" for a in batch_axes)}'
      + (f' and {d.micro_batches} micro-batches' if d.micro_batches > 1 else '')
      + f'; use a multiple of {shards * d.micro_batches}')


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise UserError(message)
