"""SALT: a small model (the teacher) helps for the first `n_kd` steps, then training goes on alone.

Stage 1, steps [0, n_kd): the loss is (1 - w) * CE + w * KD per token, KD being the
cross-entropy of the student's softened distribution against the teacher's, and w
following a schedule. Stage 2, steps [n_kd, total): plain CE; the teacher's arrays are
deleted and its step is never compiled again.

The teacher is any salt checkpoint (`RUN/checkpoints/STEP`): its model config and
tokenizer hash come from the checkpoint's metadata; its parameters are restored alone
(no optimizer state), in bfloat16, into the student's mesh with the same rules.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from trainer import data, sharding, step
from trainer.checkpoint import absolute, read_meta
from trainer.errors import UserError
from trainer.model import ModelConfig, param_count

log = logging.getLogger('salt')


def kd_weight(step_number: jax.Array, *, schedule: str, weight: float, n_kd: int) -> jax.Array:
  """w at a step: `weight` at step 0, 0 from n_kd on.

  constant: w = weight until n_kd (the step transition the paper names SALT).
  linear: w falls linearly to 0 at n_kd.
  linear_ratio: w / (1 - w) falls linearly to 0 at n_kd.
  """
  left = jnp.clip(1.0 - step_number / n_kd, 0.0, 1.0)
  if schedule == 'constant':
    return jnp.where(step_number < n_kd, weight, 0.0)
  if schedule == 'linear':
    return weight * left
  ratio = weight / (1.0 - weight) * left
  return ratio / (1.0 + ratio)


@dataclasses.dataclass(frozen=True)
class Teacher:
  model: ModelConfig
  graphdef: nnx.GraphDef
  params: nnx.State  # bfloat16, sharded like the student's
  config: dict  # the teacher run's resolved config
  path: str


def teacher_model_config(model: dict) -> ModelConfig:
  """The teacher's model from its run's config; it is never differentiated, so nothing
  is recomputed (whatever remat policy its own run used)."""
  return ModelConfig(**{**model, 'remat': 'save_everything'})


def teacher_metadata(path: str) -> dict:
  """The teacher checkpoint's `meta` item: config and versions. Raises UserError if unreadable."""
  return read_meta(path, named=f'salt.teacher={path!r}')


def abstract_teacher(cfg: ModelConfig, mesh: Mesh, rules: sharding.Rules) -> Teacher:
  """A teacher's structure, and its parameters' bfloat16 shapes and shards in `mesh`."""
  graphdef, abstract_params = step.abstract_model(cfg)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=s),
                        abstract_params, step.param_shardings(abstract_params, mesh, rules))
  return Teacher(model=cfg, graphdef=graphdef, params=params, config={}, path='')


def load_teacher(path: str, mesh: Mesh, rules: sharding.Rules, tokenizer_sha256: str | None,
                 vocab_size: int | None = None) -> Teacher:
  """Restores a teacher's parameters (only) in bfloat16 into `mesh`.

  Raises UserError when the path is not a checkpoint or cannot be read, when the
  teacher was trained with another tokenizer than `tokenizer_sha256`, the student's
  data's (None: no data to check against), or has another number of vocabulary rows
  than the student's `vocab_size` (None: no student).
  """
  meta = teacher_metadata(path)
  teacher_config = meta['config']
  if tokenizer_sha256 is not None and teacher_config['data']['tokenizer_sha256'] != tokenizer_sha256:
    raise UserError(
        f'the teacher {path} was trained with tokenizer {teacher_config["data"]["tokenizer_sha256"][:12]}..., '
        f'the student\'s data with {tokenizer_sha256[:12]}...; prepare the data with the teacher\'s '
        'tokenizer (salt prepare --tokenizer)')
  rows = teacher_config['model']['vocab_size']
  if vocab_size is not None and rows != vocab_size:
    # One tokenizer may be padded to different sizes (Qwen2.5: 151,665 tokens, 151,936 rows).
    raise UserError(f'the teacher {path} has {rows} vocabulary rows and the student model.vocab_size={vocab_size}; '
                    f'distillation compares them row by row: set --config.model.vocab_size={rows}')
  abstract = abstract_teacher(teacher_model_config(teacher_config['model']), mesh, rules)
  target = abstract.params
  try:
    restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
        absolute(path) / 'state',
        args=ocp.args.PyTreeRestore(item={'params': target}, partial_restore=True,
                                    restore_args={'params': ocp.checkpoint_utils.construct_restore_args(target)}))
  except Exception as e:  # Orbax and TensorStore raise many types for unreadable data
    raise UserError(f'salt.teacher={path!r}: cannot read its parameters ({type(e).__name__})') from None
  return dataclasses.replace(abstract, params=restored['params'], config=teacher_config, path=str(path))


def free(teacher: Teacher) -> None:
  """Deletes the teacher's device arrays: stage 2 has no use for them."""
  for x in jax.tree.leaves(teacher.params):
    x.delete()


class Stages:
  """Which batches and which step each step uses. Steps [0, n_kd) are stage 1: the
  records the selection keeps (all without one), distilled from the teacher when there
  is one; the rest are stage 2: all records, the plain step, the teacher's arrays freed.
  Stage 2 reads the full stream from its start: its step s reads the stream's step s - n_kd."""

  def __init__(self, program, config: ml_collections.ConfigDict, streams, first_step: int, mesh: Mesh):
    self.program, self.n_kd = program, config.salt.n_kd
    self.teacher = self.distillation_step = None
    if config.salt.teacher and first_step < self.n_kd:
      self.teacher = load_teacher(config.salt.teacher, mesh, sharding.parse_rules(config.sharding),
                                  streams.manifest['tokenizer_sha256'], config.model.vocab_size)
      self.distillation_step = program.distillation_step(self.teacher)
      log.info('teacher: %s, %.1fM parameters; distillation for steps [%d, %d)', self.teacher.path,
               param_count(self.teacher.model) / 1e6, first_step, self.n_kd)
    loader = functools.partial(data.train_batches, global_batch=config.data.global_batch_size,
                               seed=config.data.shuffle_seed, process_index=jax.process_index(),
                               process_count=jax.process_count(), workers=config.data.workers)
    self.stage1 = loader(streams.stage1, first_step=first_step, num_steps=max(self.n_kd - first_step, 0))
    self.stage2 = loader(streams.full, first_step=max(first_step - self.n_kd, 0),
                         num_steps=config.total_steps - max(first_step, self.n_kd))

  def step(self, state, step_index: int):
    """(state, metrics) after step `step_index`, dispatched without waiting for it."""
    if step_index < self.n_kd:
      batch = sharding.host_batch_to_global(next(self.stage1), self.program.batch_sharding)
      if self.teacher:
        return self.distillation_step(state, batch, self.teacher.params)
      return self.program.train_step(state, batch)
    if self.teacher:
      jax.block_until_ready(state)  # the last stage-1 step has read the teacher
      free(self.teacher)
      self.teacher = self.distillation_step = None
      log.info('step %d: stage 2, the teacher\'s arrays are freed', step_index)
    return self.program.train_step(state, sharding.host_batch_to_global(next(self.stage2),
                                                                        self.program.batch_sharding))

  def close(self) -> None:
    self.stage1.close()
    self.stage2.close()
