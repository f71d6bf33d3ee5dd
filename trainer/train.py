"""The training loop: build mesh, data, state and steps from a config; train; report."""

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

import kernels
from kernels import attention
from trainer import DISTRIBUTION, checkpoint, corpus, data, memory, metrics, progress, salt, sharding, step, tasks
from trainer.checkpoint_files import checkpoint_tokenizer, read_checkpoint
from trainer.config import defaults, mesh_shape, validate
from trainer.errors import Diverged, Preempted, UserError
from trainer.lock import RunLock
from trainer.model import ModelConfig, flops_per_token, param_count
from trainer.optimizer import learning_rate_schedule, make_optimizer
from trainer.prepare import FORMAT, prepare, read_manifest
from trainer.tokenizer import Tokenizer, load as load_tokenizer

log = logging.getLogger('salt')


def default_data_dir(vocab_size: int) -> Path:
  """The embedded Shakespeare corpus, prepared once per vocabulary size."""
  prepared = corpus.cache_dir() / 'shakespeare' / f'prepared-f{FORMAT}-v{vocab_size}'
  # One process prepares (the others may share its disk) while the rest wait for it.
  if jax.process_index() == 0 and not (prepared / 'manifest.json').exists():
    log.info('preparing the default corpus (Shakespeare) into %s', prepared)
    train_files, validation_files = corpus.split_files(corpus.shakespeare_texts())
    prepare([str(f) for f in train_files], prepared, validation=[str(f) for f in validation_files],
            vocab_size=vocab_size, progress=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('default corpus prepared')
    if not (prepared / 'manifest.json').exists():
      raise UserError(f'{prepared} is not on this host\'s disk: with several hosts, prepare the data on '
                      'shared storage with `salt prepare` and set data.path')
  return prepared


def check_tokenizer(config: ml_collections.ConfigDict, manifest: dict, data_dir: Path) -> None:
  """The data must be tokenized for this model: by the model's tokenizer, into a vocabulary
  that holds every id of the tokenizer. A model's vocabulary may be padded past its
  tokenizer's (Qwen2.5: 151,936 rows for 151,665 tokens): the data never holds the
  padding rows' ids, so they are never targets."""
  if config.model.vocab_size < manifest['vocab_size']:
    raise UserError(f'model.vocab_size={config.model.vocab_size} but the tokenizer of {data_dir} has '
                    f'{manifest["vocab_size"]} tokens; set --config.model.vocab_size={manifest["vocab_size"]}')
  want = config.data.tokenizer_sha256
  if want and want != manifest['tokenizer_sha256']:
    raise UserError(f'the data in {data_dir} was tokenized with tokenizer '
                    f'{manifest["tokenizer_sha256"][:12]}..., not the model\'s {want[:12]}...; '
                    'prepare it with `salt prepare --tokenizer` and the model\'s tokenizer')


def select(selection: ml_collections.ConfigDict, manifest: dict, data_dir: Path) -> np.ndarray | None:
  """The training records the selection keeps (None: all of them). A relative path that
  is not here is looked up in the data directory, where `salt score` writes by default."""
  if not selection.scores:
    return None
  path = Path(selection.scores)
  if not path.is_file() and not path.is_absolute():
    path = data_dir / path
  if not path.is_file():
    raise UserError(f'data.selection.scores={selection.scores!r} does not exist')
  if path.suffix != '.npy':
    raise UserError(f'data.selection.scores={selection.scores!r} is not a .npy file of scores; salt score writes '
                    'one (its summary is the .json beside it)')
  try:
    scores = np.load(path)
  except (ValueError, EOFError):  # cut short, not an array, or pickled objects
    raise UserError(f'{path} cannot be read as a .npy array; write it again with salt score') from None
  if not isinstance(scores, np.ndarray):  # a .npz archive under a .npy name
    scores.close()
    raise UserError(f'{path} cannot be read as a .npy array: it is an archive; write it again with salt score')
  records = manifest['splits']['train']['records']
  if scores.shape != (records,):
    raise UserError(f'{path} holds {scores.shape} scores; the training split has {records} records')
  if not np.issubdtype(scores.dtype, np.floating):
    raise UserError(f'{path} holds {scores.dtype} values; scores are floats (NaN: unscored), as salt score writes')
  return data.select_records(scores, rule=selection.rule, keep_fraction=selection.keep_fraction,
                             band=(selection.band_low, selection.band_high))


def versions() -> dict[str, str]:
  return {'salt': importlib.metadata.version(DISTRIBUTION),
          **{name: importlib.metadata.version(name) for name in ('jax', 'flax', 'optax', 'orbax-checkpoint', 'grain')}}


@dataclasses.dataclass(frozen=True)
class Program:
  """What a config compiles to on one mesh: state initialisation and the steps."""
  init: Callable[[int], step.TrainState]
  abstract_state: step.TrainState
  train_step: Callable
  distillation_step: Callable[[salt.Teacher], Callable]
  eval_step: Callable
  likelihood_step: tasks.LikelihoodStep  # the evaluation tasks'
  batch_sharding: NamedSharding


def make_mesh(config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None) -> Mesh:
  """The config's mesh over `devices` (default: every device of the job), DCN data axis included."""
  count = jax.device_count() if devices is None else len(devices)
  return sharding.make_mesh(mesh_shape(config.mesh, count), devices, dcn_data=config.mesh.dcn_data)


def check_loss(config: ml_collections.ConfigDict, mesh: Mesh, widths: tuple[int, ...]) -> None:
  """Raises UserError when loss.impl is named and cannot run on this mesh's devices at
  these model widths (the student's, and the teacher's in stage 1)."""
  device = mesh.devices.flat[0]
  try:
    kernels.losses.choose(config.loss.impl, device.platform, config.salt.teacher_top_k,
                          device_kind=device.device_kind, widths=widths,
                          itemsize=jnp.dtype(config.model.dtype).itemsize)
  except ValueError as e:
    raise UserError(f'loss.impl={config.loss.impl!r}: {e}; loss.impl=auto picks one that can') from None


def loss_fn(config: ml_collections.ConfigDict, mesh: Mesh, rules: sharding.Rules) -> step.LossFn:
  """The loss kernels as the config sets them: tokens split like the batch, the vocabulary like `vocab`."""
  loss = config.loss
  check_loss(config, mesh, (config.model.d_model,))
  return functools.partial(kernels.weighted_loss, impl=loss.impl, chunk=loss.vocab_chunk,
                           block_t=loss.block_tokens, block_v=loss.block_vocab, chunk_tokens=loss.chunk_tokens,
                           mesh=mesh, token_axes=rules['batch'], vocab_axes=rules['vocab'])


def attention_fn(impl: str, cfg: ModelConfig, seq_len: int, mesh: Mesh, rules: sharding.Rules) -> attention.Attention:
  """The attention kernel a model runs on `mesh`: `impl`, or for `auto` the fastest
  that keeps document boundaries on that device; rows split like the batch, heads
  like `heads` and `kv_heads`.

  Raises UserError when `impl` is named and cannot run this model on this device.
  """
  backend = mesh.devices.flat[0].platform
  try:
    chosen = attention.choose(impl, backend, jnp.dtype(cfg.dtype), seq_len, cfg.head_dim, cfg.sliding_window)
  except ValueError as e:
    raise UserError(f'attention.impl={impl!r}: {e}; attention.impl=auto picks one that can') from None
  return attention.make_attention(chosen, mesh=mesh, batch_axes=rules['batch'], head_axes=rules['heads'],
                                  kv_head_axes=rules['kv_heads'])


def build(config: ml_collections.ConfigDict, mesh: Mesh, token_bytes: np.ndarray) -> Program:
  """Builds optimizer, shardings and jitted steps from a validated config."""
  rules = sharding.parse_rules(config.sharding)
  model_cfg = ModelConfig(**config.model)
  o = config.optim
  schedule = learning_rate_schedule(o.lr, o.warmup_steps, config.total_steps, o.decay, o.min_lr_ratio)
  tx = make_optimizer(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                      clip_norm=o.clip_norm)
  graphdef, abstract_params = step.abstract_model(model_cfg)
  shardings = step.state_shardings(abstract_params, tx, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  losses = loss_fn(config, mesh, rules)
  seq_len = config.data.seq_len
  attend = attention_fn(config.attention.impl, model_cfg, seq_len, mesh, rules)
  skip_nonfinite = config.nonfinite == 'skip'
  train_step, eval_step = step.jit_steps(
      step.make_train_step(graphdef, tx, schedule, losses, attend, skip_nonfinite=skip_nonfinite,
                           micro_batches=config.data.micro_batches),
      step.make_eval_step(graphdef, losses, attend, token_bytes),
      shardings, batch_sharding, mesh)

  def distillation_step(teacher: salt.Teacher) -> Callable:
    k = config.salt
    weight = functools.partial(salt.kd_weight, schedule=k.schedule, weight=k.weight, n_kd=k.n_kd)
    check_loss(config, mesh, (model_cfg.d_model, teacher.model.d_model))
    teacher_attend = attention_fn(config.attention.impl, teacher.model, seq_len, mesh, rules)
    distillation = step.Distillation(teacher.graphdef, teacher_attend, weight, k.tau, k.tau_squared,
                                     k.teacher_top_k)
    return step.jit_distillation_step(
        step.make_train_step(graphdef, tx, schedule, losses, attend, skip_nonfinite=skip_nonfinite,
                             distillation=distillation, micro_batches=config.data.micro_batches),
        shardings, batch_sharding, jax.tree.map(lambda x: x.sharding, teacher.params), mesh)

  likelihood_step = step.jit_likelihood_step(step.make_likelihood_step(graphdef, attend, config.loss.vocab_chunk),
                                             shardings.params, batch_sharding, mesh)
  return Program(init=functools.partial(step.init_state, model_cfg, tx, shardings=shardings),
                 abstract_state=step.abstract_state(model_cfg, tx, shardings), train_step=train_step,
                 distillation_step=distillation_step, eval_step=eval_step, likelihood_step=likelihood_step,
                 batch_sharding=batch_sharding)


def evaluate(program: Program, params, stream: data.TokenStream, config: ml_collections.ConfigDict) -> dict[str, float]:
  """Held-out loss (nats/token) and bits per byte over `eval.batches` batches."""
  totals = {'loss_sum': 0.0, 'tokens': 0.0, 'bytes': 0.0}
  for batch in data.eval_batches(
      stream, global_batch=config.data.global_batch_size, max_batches=config.eval.batches,
      process_index=jax.process_index(), process_count=jax.process_count()):
    sums = jax.device_get(program.eval_step(params, sharding.host_batch_to_global(batch, program.batch_sharding)))
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  return {'eval_loss': totals['loss_sum'] / max(totals['tokens'], 1.0),
          'eval_bits_per_byte': metrics.bits_per_byte(totals['loss_sum'], totals['bytes'])}


def task_files(names: list[str]) -> list[Path]:
  """eval.tasks' files: each a path, or a task of the embedded corpus (corpus.TASKS),
  built from its validation plays."""
  if not set(names) & set(corpus.TASKS):
    return [Path(n) for n in names]
  directory = corpus.task_dir()
  # Built afresh at every start (a tenth of a second), so a file is never one that older code
  # built; one process writes them (the others may share its disk) while the rest wait.
  if jax.process_index() == 0:
    corpus.write_tasks(corpus.shakespeare_texts(), directory)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('corpus tasks written')
  return [directory / f'{n}.jsonl' if n in corpus.TASKS else Path(n) for n in names]


def open_tasks(config: ml_collections.ConfigDict, program: Program, tokenizer: Tokenizer) -> tasks.Evaluator | None:
  """The tasks eval.tasks names, encoded for this model (None: no tasks)."""
  named = tasks.names(config.eval.tasks)
  if not named:
    return None
  return tasks.Evaluator(tasks.read_tasks(task_files(named)), tokenizer, seq_len=config.data.seq_len,
                         shots=config.eval.task_shots, separator=config.eval.task_separator,
                         step=program.likelihood_step, batch_sharding=program.batch_sharding,
                         global_batch=config.data.global_batch_size)


def task_metrics(scores: dict[str, dict[str, float]]) -> dict[str, float]:
  """Each task's metrics as logged: tasks/NAME/METRIC."""
  return {f'tasks/{name}/{metric}': value for name, task in scores.items() for metric, value in task.items()}


def evaluate_checkpoint(path: Path, task_setting: str | list[str] | None = None, shots: int | None = None,
                        tokenizer: Path | None = None) -> list[dict]:
  """`salt eval`: each task's metrics on a checkpoint, with the code and config of
  in-run evaluation; `task_setting` and `shots` replace eval.tasks and eval.task_shots."""
  meta_config, params = read_checkpoint(path)
  given = {k: v for k, v in (('tasks', task_setting), ('task_shots', shots)) if v is not None}
  # A checkpoint of a run before evaluation tasks existed has no task settings: the defaults'.
  config = ml_collections.ConfigDict(
      {**meta_config, 'eval': {**defaults().eval.to_dict(), **meta_config['eval'], **given}})
  if not tasks.names(config.eval.tasks):
    raise UserError(f'{path} was trained with no eval.tasks; name the tasks with --tasks FILE.jsonl,...')
  if config.eval.task_shots < 0:
    raise UserError(f'--shots {config.eval.task_shots} must be >= 0')
  tok = checkpoint_tokenizer(path, meta_config, tokenizer)
  mesh = make_mesh(config)
  program = build(config, mesh, tok.token_bytes())
  evaluator = open_tasks(config, program, tok)
  _, state = step.abstract_model(ModelConfig(**config.model))
  nnx.replace_by_pure_dict(state, params)
  scores = evaluator(jax.device_put(state, jax.tree.map(lambda x: x.sharding, program.abstract_state.params)))
  step_number = int(Path(path).name)
  return [{'task': t.name, 'file': str(t.path), 'step': step_number, 'examples': len(t.examples),
           'shots': config.eval.task_shots, **scores[t.name]} for t in evaluator.tasks]


def data_fingerprint(config: ml_collections.ConfigDict, manifest: dict, selection: np.ndarray | None) -> dict:
  """What the batch of a step depends on besides the step: the loader's state is the step plus this."""
  shards = manifest['splits']['train']['shards']
  return {
      'tokenizer_sha256': manifest['tokenizer_sha256'],
      # The content of the training shards, in order (None for data prepared before salt recorded it).
      'train_sha256': hashlib.sha256(''.join(s['sha256'] for s in shards).encode()).hexdigest()
                      if all('sha256' in s for s in shards) else None,
      'train_records': manifest['splits']['train']['records'],
      'train_tokens': manifest['splits']['train']['tokens'],
      'selection_sha256': None if selection is None else hashlib.sha256(selection.astype('<i8').tobytes()).hexdigest(),
      'n_kd': config.salt.n_kd,
      'shuffle_seed': config.data.shuffle_seed,
      'seq_len': config.data.seq_len,
      'global_batch_size': config.data.global_batch_size,
  }


def log_stage1_passes(rows: int, stream: data.TokenStream, selected: bool) -> float:
  """How many times stage 1 reads its data (rows read over rows there); a selection read
  more than once is said as a warning: its records are repeated. Returns the passes."""
  passes = rows / len(stream)
  log.info('stage 1 reads %d rows of %d: %.2f passes over its %s', rows, len(stream), passes,
           'selected records' if selected else 'data')
  if selected and passes > 1:
    log.warning('the selection (%d rows) is smaller than stage 1 reads (%d rows): each selected record is read '
                '%.2f times; keep more (data.selection.keep_fraction) or shorten salt.n_kd', len(stream), rows, passes)
  return passes


def check_resumed_data(saved: dict, current: dict, step: int, allow_change: bool) -> list[str]:
  """A resumed run must read the batches the interrupted one would have read: what
  differs is an error, unless `allow_change` (then a warning). Returns what differs."""
  if saved['tokenizer_sha256'] != current['tokenizer_sha256']:
    raise UserError(f'the checkpoint at step {step} was trained on data with another tokenizer '
                    f'({saved["tokenizer_sha256"][:12]}..., now {current["tokenizer_sha256"][:12]}...)')
  changed = [f'{k} {_short(saved.get(k))} -> {_short(current[k])}' for k in current
             if k in saved and saved[k] is not None and saved[k] != current[k]]
  if changed and not allow_change:
    raise UserError(f'resuming at step {step} would read other batches than the interrupted run ('
                    f'{"; ".join(changed)}); restore those settings and data, or resume with --allow-data-change '
                    'to go on with these (recorded in config.json)')
  if changed:
    log.warning('resuming at step %d with other data (%s): from here on the batches differ from those the '
                'interrupted run would have read', step, '; '.join(changed))
  return changed


def _short(value):
  return f'{value[:12]}...' if isinstance(value, str) and len(value) == 64 else value


def mean_metrics(pending: list[dict]) -> dict[str, float]:
  """Each metric's mean over the steps that reported it (stage 1 reports more than stage 2)."""
  keys = dict.fromkeys(k for m in pending for k in m)
  return {k: float(np.mean([m[k] for m in pending if k in m])) for k in keys}


def first_nonfinite(pending: list[dict], first_step: int) -> int | None:
  """The step of the first loss or gradient norm that is not finite, if any."""
  for offset, m in enumerate(pending):
    if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
      return first_step + offset
  return None


def train(config: ml_collections.ConfigDict, workdir: epath.PathLike, resume: str = 'auto',
          allow_data_change: bool = False) -> dict[str, float]:
  """Runs `config.total_steps` steps, writing everything under `workdir`; returns the last metrics.

  `workdir` may be local or remote (gs://...). Resumes from the checkpoints in
  `workdir` (see `Checkpoints.restore` for `resume`); a resume whose data or data
  settings differ from the checkpoint's is refused unless `allow_data_change`.
  Raises Preempted after saving when a stop signal arrives, Diverged when the loss is
  not finite (and nonfinite='stop'), UserError for bad input or when another job
  trains in `workdir` (process 0 holds its lock, trainer.lock).
  """
  validate(config, jax.device_count())
  workdir = epath.Path(workdir)
  with RunLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    run, state = open_run(config, workdir, resume, allow_data_change)
    try:
      last = train_loop(run, state, salt.Stages(run.program, config, run.data, run.first_step, run.mesh))
    finally:
      run.checkpoints.close()
  if 'eval_loss' in last:
    log.info('validation: loss %.3f nats/token (unigram entropy %.3f), %.3f bits/byte',
             last['eval_loss'], run.data.manifest['unigram_entropy'], last['eval_bits_per_byte'])
  log.info('run directory: %s\n  metrics:     %s\n  tensorboard: tensorboard --logdir %s\n  checkpoints: %s',
           workdir, workdir / 'metrics.jsonl', workdir / 'tensorboard', workdir / 'checkpoints')
  return last


def train_loop(run: 'Run', state: step.TrainState, stages: salt.Stages) -> dict[str, float]:
  """Steps from the restored one to the last, with the periodic chores: metrics are
  fetched, checked and logged every log.every_steps (and evaluated every
  eval.every_steps), checkpoints saved every checkpoint.every_steps and at a stop."""
  config, first_step = run.config, run.first_step
  writer = metrics.MetricWriter(run.workdir, enabled=jax.process_index() == 0)
  throughput = metrics.Throughput(run.flops_per_token, config.data.global_batch_size * config.data.seq_len,
                                  jax.devices(), run.train_seconds)
  stop = checkpoint.StopSignals()
  bar = progress.bar(config.total_steps, first_step, enabled=jax.process_index() == 0)
  pending, last = [], {}
  try:
    for step_index in range(first_step, config.total_steps):
      state, step_metrics = stages.step(state, step_index)
      pending.append(step_metrics)
      done = step_index + 1
      bar.update(1)
      stopping = stop.reached(done)
      saving = stopping or done == config.total_steps or run.checkpoints.should_save(done)
      logging_now = done % config.log.every_steps == 0 or done == config.total_steps
      if not (saving or logging_now):
        continue
      # Metrics are fetched only here, so the host does not wait on every step.
      pending = jax.device_get(pending)
      _check_finite(run, pending, done - len(pending) + 1)
      if saving:
        _checkpoint(run, state, done, throughput.elapsed())
      if logging_now:
        last = _log(run, state, pending, done, throughput)
        writer.write(done, last)
        bar.set_postfix_str(metrics.describe(last), refresh=False)
      pending = []
      if stopping:
        run.checkpoints.wait()
        raise Preempted(done)
    run.checkpoints.wait()
  finally:
    for closing in (stop.restore, bar.close, stages.close, writer.close):
      closing()
  return last


def _check_finite(run: 'Run', fetched: list[dict], first: int) -> None:
  """With nonfinite='stop', a loss or gradient that is not finite ends the run, naming a good checkpoint."""
  bad = first_nonfinite(fetched, first) if run.config.nonfinite == 'stop' else None
  if bad is None:
    return
  run.checkpoints.wait()
  good = [s for s in run.checkpoints.manager.all_steps() if s < bad]
  raise Diverged(f'the loss or gradient is not finite at step {bad}; the last good checkpoint is '
                 f'{"step " + str(max(good)) if good else "none"}; lower optim.lr or set '
                 '--config.nonfinite=skip to skip such batches')


def _checkpoint(run: 'Run', state: step.TrainState, done: int, train_seconds: float) -> None:
  meta = {'config': run.resolved, 'versions': run.versions, 'train_seconds': train_seconds,
          'data': {'step': done, 'fingerprint': run.fingerprint}}
  run.checkpoints.save(done, state, meta)


def _log(run: 'Run', state: step.TrainState, fetched: list[dict], done: int,
         throughput: metrics.Throughput) -> dict[str, float]:
  """The logged record of step `done`: the mean metrics since the last, throughput, evaluation."""
  config = run.config
  record = {**mean_metrics(fetched), 'stage': 1 if done <= config.salt.n_kd else 2, **throughput(done)}
  last = done == config.total_steps
  evaluating = run.data.eval and (done % config.eval.every_steps == 0 or last)
  scoring = run.tasks and (done % (config.eval.task_every_steps or config.eval.every_steps) == 0 or last)
  if evaluating:
    record.update(evaluate(run.program, state.params, run.data.eval, config))
  if scoring:
    record.update(task_metrics(run.tasks(state.params)))
  if evaluating or scoring:
    throughput.restart(done)
  return record


@dataclasses.dataclass(frozen=True)
class RunData:
  """A run's data: the prepared directory and the streams each stage reads."""
  path: Path
  manifest: dict
  selection: np.ndarray | None  # the record ids stage 1 reads; None: all
  full: data.TokenStream  # stage 2's
  stage1: data.TokenStream
  eval: data.TokenStream | None


def open_data(config: ml_collections.ConfigDict) -> RunData:
  """The data, checked against the model's tokenizer, each split's shards verified."""
  data_dir = Path(config.data.path) if config.data.path else default_data_dir(config.model.vocab_size)
  manifest = read_manifest(data_dir)
  check_tokenizer(config, manifest, data_dir)
  selection = select(config.data.selection, manifest, data_dir)
  open_split = functools.partial(data.TokenStream, data_dir, seq_len=config.data.seq_len,
                                 verify_hashes=config.data.verify_hashes)
  full = open_split('train')
  return RunData(path=data_dir, manifest=manifest, selection=selection, full=full,
                 stage1=full if selection is None else open_split('train', records=selection),
                 eval=open_split('validation') if 'validation' in manifest['splits'] else None)


@dataclasses.dataclass(frozen=True)
class Run:
  """An opened run: what the loop needs besides the train state (which each step donates)."""
  config: ml_collections.ConfigDict
  workdir: epath.Path
  mesh: Mesh
  program: 'Program'
  data: RunData
  checkpoints: checkpoint.Checkpoints
  first_step: int  # the restored state's step (0: fresh)
  train_seconds: float  # training time before this start (evaluation excluded)
  resolved: dict  # the config as run: the data directory and tokenizer filled in
  fingerprint: dict  # what the batches depend on besides the step
  versions: dict
  flops_per_token: float
  tasks: tasks.Evaluator | None  # eval.tasks, scored beside the loss


def open_run(config: ml_collections.ConfigDict, workdir: epath.Path, resume: str,
             allow_data_change: bool) -> tuple[Run, step.TrainState]:
  """Mesh, data, program, and the state (restored per `resume`, or fresh); writes config.json."""
  if config.salt.n_kd and config.salt.weight and not config.salt.teacher:
    raise UserError(f'salt.n_kd={config.salt.n_kd} distills with salt.weight={config.salt.weight} but salt.teacher '
                    'is not set: give the small model\'s checkpoint (--config.salt.teacher=RUN/checkpoints/STEP), '
                    'or --config.salt.weight=0 for a stage 1 of selected data alone')
  mesh = make_mesh(config)
  run_data = open_data(config)
  tok = load_tokenizer(run_data.path / run_data.manifest['tokenizer'])
  program = build(config, mesh, tok.token_bytes())
  evaluator = open_tasks(config, program, tok)
  # Before anything is allocated: a state too big for the devices is one line, not an
  # out-of-memory kill (`salt dryrun` checks the compiled step as well).
  memory.check_fits('the train state (parameters, optimizer moments)', memory.state_bytes(program.abstract_state),
                    *memory.local_device_memory(), memory.STATE_REMEDY)
  resolved = config.to_dict()
  resolved['data'].update(path=str(run_data.path), tokenizer_sha256=run_data.manifest['tokenizer_sha256'])
  fingerprint = data_fingerprint(config, run_data.manifest, run_data.selection)
  checkpoints = checkpoint.Checkpoints(
      workdir / 'checkpoints', every_steps=config.checkpoint.every_steps,
      max_to_keep=config.checkpoint.max_to_keep, keep_every_steps=config.checkpoint.keep_every_steps,
      async_save=config.checkpoint.async_save)
  restored = checkpoints.restore(program.abstract_state, resume, model=config.model.to_dict())
  if restored:
    state, meta = restored
    train_seconds = meta.get('train_seconds', 0.0)
    data_changes = check_resumed_data(meta['data']['fingerprint'], fingerprint, int(state.step), allow_data_change)
    log.info('resumed from the checkpoint at step %d', int(state.step))
  else:
    state, train_seconds, data_changes = program.init(config.seed), 0.0, []
  run = Run(config=config, workdir=workdir, mesh=mesh, program=program, data=run_data, checkpoints=checkpoints,
            first_step=int(state.step), train_seconds=train_seconds, resolved=resolved, fingerprint=fingerprint,
            versions=versions(), flops_per_token=flops_per_token(ModelConfig(**config.model), config.data.seq_len),
            tasks=evaluator)
  if jax.process_index() == 0:
    write_run_config(run, data_changes)
  describe(run)
  return run, state


def write_run_config(run: Run, data_changes: list[str]) -> None:
  """RUN/config.json: the resolved config, the selection, the versions, and every data
  change allowed on resume (kept whatever config wrote the file last)."""
  selection, manifest = run.data.selection, run.data.manifest
  kept = {'records': len(selection), 'of': manifest['splits']['train']['records'],
          'ids_sha256': run.fingerprint['selection_sha256']} if selection is not None else None
  run.workdir.mkdir(parents=True, exist_ok=True)
  written = run.workdir / 'config.json'
  history = _recorded_data_changes(written)
  if data_changes:
    history.append({'step': run.first_step, 'changes': data_changes})
  # Written beside it, then renamed over it: a write cut short leaves the previous file whole.
  partial = run.workdir / 'config.json.partial'
  partial.write_text(json.dumps({'config': run.resolved, 'selection': kept, 'versions': run.versions,
                                 'data_changes': history}, indent=2))
  partial.replace(written)


def _recorded_data_changes(written: epath.Path) -> list[dict]:
  """The data changes that earlier starts recorded in RUN/config.json (none without it).
  Raises UserError when the file is not what salt writes."""
  if not written.exists():
    return []
  remedy = ('restore it, or delete it to record this run afresh (forgetting the data changes allowed on '
            'earlier resumes, which it lists)')
  try:
    recorded = json.loads(written.read_text())
  except ValueError as e:  # not JSON, or not text
    raise UserError(f'{written} is damaged (not JSON: {e}): {remedy}') from None
  if not isinstance(recorded, dict) or not isinstance(recorded.get('data_changes', []), list):
    raise UserError(f'{written} is damaged (not the object salt writes): {remedy}')
  return recorded.get('data_changes', [])


def describe(run: Run) -> None:
  """Logs the model, the mesh and the data of the run."""
  config, streams, manifest = run.config, run.data, run.data.manifest
  log.info('model: %.1fM parameters, %.3g training FLOPs/token; mesh %s on %d %s device(s)',
           param_count(ModelConfig(**config.model)) / 1e6, run.flops_per_token, dict(run.mesh.shape),
           jax.device_count(), jax.devices()[0].device_kind)
  log.info('data: %s (%d training tokens, %d rows of %d); unigram entropy %.3f nats/token', streams.path,
           streams.full.offsets[-1], len(streams.full), config.data.seq_len + 1, manifest['unigram_entropy'])
  if config.salt.n_kd:
    log_stage1_passes(config.salt.n_kd * config.data.global_batch_size, streams.stage1,
                      selected=streams.selection is not None)
  if streams.selection is not None:
    log.info('stage 1 reads %d of %d records (%d tokens), selected by %s', len(streams.selection),
             manifest['splits']['train']['records'], streams.stage1.offsets[-1], config.data.selection.rule)
