"""The training loop: build mesh, data, state and steps from a config; train; report."""

import dataclasses
import functools
import importlib.metadata
import json
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from trainer import corpus, data, metrics, sharding, step
from trainer.config import mesh_shape, validate
from trainer.errors import UserError
from trainer.model import ModelConfig, flops_per_token, param_count
from trainer.optimizer import learning_rate_schedule, make_optimizer
from trainer.prepare import prepare, read_manifest

log = logging.getLogger('salt')


def default_data_dir(vocab_size: int) -> Path:
  """The embedded Shakespeare corpus, prepared once per vocabulary size."""
  prepared = corpus.cache_dir() / 'shakespeare' / f'prepared-v{vocab_size}'
  if not (prepared / 'manifest.json').exists():
    log.info('preparing the default corpus (Shakespeare) into %s', prepared)
    train_files, validation_files = corpus.split_files(corpus.shakespeare_texts())
    prepare([str(f) for f in train_files], prepared, validation=[str(f) for f in validation_files],
            vocab_size=vocab_size)
  return prepared


def versions() -> dict[str, str]:
  return {name: importlib.metadata.version(name)
          for name in ('salt', 'jax', 'flax', 'optax', 'orbax-checkpoint', 'grain')}


@dataclasses.dataclass(frozen=True)
class Program:
  """What a config compiles to on one mesh: state initialisation and the two steps."""
  init: Callable[[int], step.TrainState]
  train_step: Callable
  eval_step: Callable
  batch_sharding: NamedSharding


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
  train_step, eval_step = step.jit_steps(
      step.make_train_step(graphdef, tx, schedule, config.loss.vocab_chunk),
      step.make_eval_step(graphdef, config.loss.vocab_chunk, token_bytes),
      shardings, batch_sharding, mesh)
  return Program(init=functools.partial(step.init_state, model_cfg, tx, shardings=shardings),
                 train_step=train_step, eval_step=eval_step, batch_sharding=batch_sharding)


def evaluate(program: Program, params, data_dir: Path, config: ml_collections.ConfigDict) -> dict[str, float]:
  """Held-out loss (nats/token) and bits per byte over `eval.batches` batches."""
  totals = {'loss_sum': 0.0, 'tokens': 0.0, 'bytes': 0.0}
  for batch in data.eval_batches(
      data_dir, seq_len=config.data.seq_len, max_batches=config.eval.batches,
      batch_size=config.data.global_batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count()):
    sums = jax.device_get(program.eval_step(params, sharding.host_batch_to_global(batch, program.batch_sharding)))
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  return {'eval_loss': totals['loss_sum'] / max(totals['tokens'], 1.0),
          'eval_bits_per_byte': metrics.bits_per_byte(totals['loss_sum'], totals['bytes'])}


def train(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, float]:
  """Runs `config.total_steps` steps, writing everything under `workdir`; returns the last metrics."""
  validate(config, jax.device_count())
  workdir = Path(workdir)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(mesh_shape(config.mesh, jax.device_count()))
  model_cfg = ModelConfig(**config.model)
  data_dir = Path(config.data.path) if config.data.path else default_data_dir(model_cfg.vocab_size)
  manifest = read_manifest(data_dir)
  if manifest['vocab_size'] != model_cfg.vocab_size:
    raise UserError(f'model.vocab_size={model_cfg.vocab_size} but the tokenizer of {data_dir} has '
                    f'{manifest["vocab_size"]} tokens; set --config.model.vocab_size={manifest["vocab_size"]}')

  token_bytes = data.token_bytes(data_dir / manifest['tokenizer'])
  program = build(config, mesh, token_bytes)
  state = program.init(config.seed)

  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(
        json.dumps({'config': config.to_dict(), 'versions': versions(), 'data': str(data_dir)}, indent=2))
  seq_len, global_batch = config.data.seq_len, config.data.global_batch_size
  flops = flops_per_token(model_cfg, seq_len)
  log.info('model: %.1fM parameters, %.3g training FLOPs/token; mesh %s on %d %s device(s)',
           param_count(model_cfg) / 1e6, flops, dict(mesh.shape), jax.device_count(),
           jax.devices()[0].device_kind)
  log.info('data: %s (%d training tokens); unigram entropy %.3f nats/token',
           data_dir, manifest['splits']['train']['tokens'], manifest['unigram_entropy'])

  batches = data.train_batches(
      data_dir, seq_len=seq_len, batch_size=global_batch // jax.process_count(),
      seed=config.data.shuffle_seed, process_index=jax.process_index(), process_count=jax.process_count())
  writer = metrics.MetricWriter(workdir, enabled=is_main)
  throughput = metrics.Throughput(flops, global_batch * seq_len, jax.devices())
  has_validation = 'validation' in manifest['splits']
  bar = metrics.progress_bar(config.total_steps, int(state.step), enabled=is_main)
  pending, last = [], {}
  for step_index in range(int(state.step), config.total_steps):
    state, step_metrics = program.train_step(state, sharding.host_batch_to_global(next(batches), program.batch_sharding))
    pending.append(step_metrics)
    done = step_index + 1
    if done % config.log.every_steps == 0 or done == config.total_steps:
      last = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
      last.update(throughput(done))
      pending = []
      if has_validation and (done % config.eval.every_steps == 0 or done == config.total_steps):
        last.update(evaluate(program, state.params, data_dir, config))
        throughput.restart(done)
      writer.write(done, last)
      bar.set_postfix_str(metrics.describe(last), refresh=False)
    bar.update(1)
  bar.close()
  writer.close()
  if 'eval_loss' in last:
    log.info('validation: loss %.3f nats/token (unigram entropy %.3f), %.3f bits/byte',
             last['eval_loss'], manifest['unigram_entropy'], last['eval_bits_per_byte'])
  log.info('run directory: %s\n  metrics:     %s\n  tensorboard: tensorboard --logdir %s',
           workdir, workdir / 'metrics.jsonl', workdir / 'tensorboard')
  return last
