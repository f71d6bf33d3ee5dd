"""`salt dryrun`: the production train step on this machine before anyone spends pod hours.

    salt dryrun --config configs/paper.py:llm [--config.KEY=VALUE ...] [--steps 3] [--workdir DIR]
    salt dryrun --config configs/paper.py:llm --topology v5p-128        (compile only; needs libtpu)

1. Compiles, on abstract shapes (nothing allocated), the train step for the config's mesh
   on this machine's devices, and stage 1's distillation step too when SALT is on.
2. Prints parameters; per-device memory of each compiled program (arguments, temporaries,
   outputs, generated code); XLA's FLOPs and the model's (flops_per_token x tokens); and
   the best MFU the compiled FLOPs allow, where the device's peak is known.
3. Stops with a UserError if the train state (checked before compiling) or a compiled
   program needs more memory than a device has.
4. Runs a few steps of each stage on random tokens (a step's cost does not depend on
   them), saves a checkpoint, restores it, checks the restored state equals the saved
   one bit for bit, and reports step time, tokens/s and MFU.

The teacher of stage 1 is the checkpoint salt.teacher names when it exists; before the
small model is trained, --teacher-config gives its config, and a random teacher of that
size stands in.
"""

import dataclasses
import math
import re
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from trainer import checkpoint, memory, salt, sharding, step, train
from trainer import config as config_lib
from trainer.errors import UserError
from trainer.memory import GiB, REMEDY, STATE_REMEDY, check_fits, needed_bytes, size, state_bytes
from trainer.hardware import TPU_GENERATIONS, peak_flops
from trainer.model import ModelConfig, flops_per_token, param_count, recompute_flops_per_token


@dataclasses.dataclass(frozen=True)
class Target:
  """Where the step is compiled for: this machine's devices, or a TPU slice that is not here."""
  devices: list
  hbm_bytes: int | None  # per device, known for a TPU type; None: ask the device
  name: str


def local_target() -> Target:
  return Target(devices=jax.devices(), hbm_bytes=None, name=f'{jax.device_count()} x {jax.devices()[0].device_kind}')


def topology_target(accelerator_type: str, slices: int) -> Target:
  """Compile-only devices of `slices` Cloud TPU slices of a type such as v5p-128."""
  generation, _, count = accelerator_type.partition('-')
  if generation not in TPU_GENERATIONS or not count.isdigit():
    raise UserError(f'--topology {accelerator_type!r}: use a Cloud TPU type such as v5p-128, v4-64, '
                    f'v5litepod-16 or v6e-256 (generations {", ".join(TPU_GENERATIONS)})')
  tpu = TPU_GENERATIONS[generation]
  prefix, dims, hbm_gib = tpu.topology, tpu.torus_dims, tpu.hbm_gib
  chips = int(count) // tpu.cores_per_device
  shape = _torus(chips, dims)
  if shape is None:
    raise UserError(f'--topology {accelerator_type}: {chips} chips is not a power of two that fills a slice')
  from jax.experimental import topologies

  try:
    topology = topologies.get_topology_desc(
        topology_name=f'{prefix}:{"x".join(map(str, shape))}', platform='tpu',
        chip_config_name='megacore' if tpu.cores_per_device == 2 else 'default',
        chips_per_host_bounds=(2, 2, 1), num_slices=slices,
        # Slices with full rings close them into a torus: 4x4x4 and up for v4/v5p, 16-wide for v5e/v6e.
        wrap=tuple(d >= 4 and dims == 3 or d >= 16 for d in shape) + (False,) * (3 - dims))
  except (RuntimeError, NotImplementedError) as e:
    if 'lockfile' in str(e):
      raise UserError(f'--topology {accelerator_type}: another process on this machine is using libtpu (it holds '
                      '/tmp/libtpu_lockfile); wait for it to end, or remove the file if none is') from None
    raise UserError(f'--topology {accelerator_type}: this jax cannot compile for a TPU it does not have '
                    f'({str(e).splitlines()[0]}); install libtpu here (pip install "jax[tpu]==0.11.2", '
                    "salt's tpu extra) or dry-run on a TPU VM") from None
  return Target(devices=list(topology.devices), hbm_bytes=hbm_gib * GiB,
                name=f'{slices} x {accelerator_type} ({len(topology.devices)} devices)')


def _torus(chips: int, dims: int) -> tuple[int, ...] | None:
  """The chip grid of a slice: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... (or 2x2, 2x4, 4x4, ...)."""
  if chips < 1 or chips & (chips - 1):
    return None
  if dims == 3 and chips == 4:
    return (2, 2, 1)
  shape = [2] * dims if chips >= 2 ** dims else [1] * dims
  axis = dims - 1
  while math.prod(shape) < chips:
    shape[axis] *= 2
    axis = (axis - 1) % dims
  return tuple(shape)


def device_memory(target: Target) -> tuple[int | None, str]:
  """Bytes one device can hold, and what that figure is."""
  if target.hbm_bytes:
    return target.hbm_bytes, 'HBM per device'
  return memory.local_device_memory()


def teacher_config(config: ml_collections.ConfigDict, teacher_spec: str | None) -> tuple[ModelConfig, bool] | None:
  """Stage 1's teacher: its model config and whether its checkpoint is here to load."""
  if not config.salt.teacher:
    return None
  path = config.salt.teacher
  if (epath.Path(path) / 'meta').is_dir():
    return salt.teacher_model_config(salt.teacher_metadata(path)['config']['model']), True
  if teacher_spec:
    return salt.teacher_model_config(config_lib.load(teacher_spec).model.to_dict()), False
  raise UserError(f'salt.teacher={path!r} is not a checkpoint here; give --teacher-config FILE[:ARG] '
                  '(e.g. configs/paper.py:slm) to dry-run stage 1 with a random teacher of that size')


def random_teacher(abstract: salt.Teacher, seed: int) -> salt.Teacher:
  """Random parameters in the teacher's shapes and shards: a stage-1 step costs the same whatever
  they are, and host-side numbers need no compiled initialiser."""
  rng = np.random.default_rng(seed)

  def leaf(x):
    host = (rng.standard_normal(x.shape, np.float32) * 0.02).astype(jnp.bfloat16)
    return jax.make_array_from_callback(x.shape, x.sharding, lambda index: host[index])

  return dataclasses.replace(abstract, params=jax.tree.map(leaf, abstract.params), path='random')


def random_batch(rows: int, seq_len: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (rows, seq_len + 1), dtype=np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
          'segment_ids': np.ones((rows, seq_len), np.int32), 'weights': np.ones((rows, seq_len), np.float32)}


def run(config: ml_collections.ConfigDict, *, steps: int = 3, topology: str | None = None,
        workdir: Path | None = None, teacher_spec: str | None = None) -> dict:
  """The dry run; prints its report on process 0 and returns its figures."""
  if steps < 1:
    raise UserError(f'--steps {steps} must be at least 1')
  if workdir is None and jax.process_count() > 1:
    raise UserError('a dry run over several processes needs --workdir on storage they all see')
  # A multi-slice pod is mesh.dcn_data slices of the type.
  target = topology_target(topology, config.mesh.dcn_data) if topology else local_target()
  config_lib.validate(config, len(target.devices))
  say = print if jax.process_index() == 0 else (lambda *_: None)
  model_cfg = ModelConfig(**config.model)
  mesh = train.make_mesh(config, target.devices if topology else None)
  program = train.build(config, mesh, np.ones(model_cfg.vocab_size, np.int32))
  tokens = config.data.global_batch_size * config.data.seq_len
  found = teacher_config(config, teacher_spec)
  teacher = salt.abstract_teacher(found[0], mesh, sharding.parse_rules(config.sharding)) if found else None
  limit, limit_source = device_memory(target)
  say(f'devices: {target.name}; mesh {dict(mesh.shape)}; memory per device: '
      f'{size(limit) + ", " if limit else ""}{limit_source}')
  say(f'model: {param_count(model_cfg) / 1e6:,.1f}M parameters; {config.data.global_batch_size} x '
      f'{config.data.seq_len} = {tokens:,} tokens per step')
  if found:
    say(f'teacher: {param_count(found[0]) / 1e6:,.1f}M parameters, '
        f'{"from " + config.salt.teacher if found[1] else "random (its checkpoint is not here)"}')
  # Before compiling (minutes, for a big program): the state alone must fit.
  check_fits('the train state (parameters, optimizer moments' + (', teacher)' if teacher else ')'),
             state_bytes(program.abstract_state) + (state_bytes(teacher.params) if teacher else 0),
             limit, limit_source, STATE_REMEDY)

  compiled = compile_stages(config, program, teacher, target)
  figures = {'params': param_count(model_cfg), 'device_bytes': limit,
             'model_flops_per_step': flops_per_token(model_cfg, config.data.seq_len) * tokens,
             'stages': {name: report_compiled(name, executable, config, target.devices, say)
                        for name, executable in compiled.items()}}
  if peak_flops(target.devices[0]):
    for name, stage in figures['stages'].items():
      stage.update(predict(name, config, found[0] if found and name.startswith('stage 1') else None, target, say))
    hours = sum(stage['min_hours'] for stage in figures['stages'].values())
    say(f'the run ({config.total_steps:,} steps) takes at least {hours:,.1f} hours on {target.name}, '
        f'{hours * len(target.devices):,.0f} device-hours')
  for name, stage in figures['stages'].items():
    check_fits(name, stage['need_bytes'], limit, limit_source, REMEDY)
  if topology:
    say(f'compiled for {target.name}; no steps run: those devices are not here')
    return figures

  if teacher:
    # A dry run reads no data, so there is no tokenizer to hold the teacher's against.
    teacher = (salt.load_teacher(config.salt.teacher, mesh, sharding.parse_rules(config.sharding), None)
               if found[1] else random_teacher(teacher, config.seed + 1))
  state = run_stages(config, program, compiled, teacher, figures, target.devices, steps, say)
  if teacher:
    salt.free(teacher)
  figures['restored_step'] = save_and_restore(state, program.abstract_state, config, workdir, say)
  return figures


def run_stages(config: ml_collections.ConfigDict, program: train.Program, compiled: dict,
               teacher: salt.Teacher | None, figures: dict, devices: list, steps: int, say) -> step.TrainState:
  """Runs each compiled stage on random tokens, adding its timing to `figures`; the state after."""
  tokens = config.data.global_batch_size * config.data.seq_len
  state = program.init(config.seed)
  host = random_batch(config.data.global_batch_size // jax.process_count(), config.data.seq_len,
                      config.model.vocab_size, seed=jax.process_index())
  batch = sharding.host_batch_to_global(host, program.batch_sharding)
  for name, executable in compiled.items():
    extra = (teacher.params,) if name.startswith('stage 1') else ()
    state, timing = time_steps(executable, state, batch, extra, steps)
    stage = figures['stages'][name]
    stage.update(timing, **throughput(timing['step_seconds'], figures['model_flops_per_step'], tokens, devices))
    mfu = 'n/a (peak unknown)' if stage['mfu'] is None else f'{stage["mfu"]:.1%}'
    say(f'{name}: {steps + 1} steps, loss {stage["loss"]:.3f}; step {stage["step_seconds"] * 1e3:.1f} ms, '
        f'{stage["tokens_per_sec"]:,.0f} tokens/s, MFU {mfu}')
  return state


def compile_stages(config: ml_collections.ConfigDict, program: train.Program,
                   teacher: salt.Teacher | None, target: Target) -> dict[str, jax.stages.Compiled]:
  """The train step (stage 2, when SALT is on) and stage 1's distillation step, compiled on abstract shapes.

  Raises UserError with one line when a program does not fit the device's memory.
  """
  batch = {k: jax.ShapeDtypeStruct((config.data.global_batch_size, config.data.seq_len),
                                   jnp.float32 if k == 'weights' else jnp.int32, sharding=program.batch_sharding)
           for k in step.BATCH_KEYS}
  lowered = {}
  if teacher:
    lowered['stage 1 (distillation)'] = program.distillation_step(teacher).lower(
        program.abstract_state, batch, teacher.params)
  if not teacher or config.salt.n_kd < config.total_steps:
    lowered['stage 2' if teacher else 'train step'] = program.train_step.lower(program.abstract_state, batch)
  state = state_bytes(program.abstract_state) + (state_bytes(teacher.params) if teacher else 0)
  compiled = {}
  for name, program_lowered in lowered.items():
    try:
      compiled[name] = program_lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      raise UserError(out_of_memory(name, str(e), state, target)) from None
  return compiled


def out_of_memory(name: str, message: str, state: int, target: Target) -> str:
  """One line for a compiler's out-of-memory error: what was needed, what there is, what to change."""
  hbm = re.search(r'HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)', message)
  if hbm:
    scale = {'K': 2 ** 10, 'M': 2 ** 20, 'G': GiB, 'T': 2 ** 40}
    temporaries, available = (float(hbm[i]) * scale[hbm[i + 1]] for i in (1, 3))
    return (f'{name} does not fit on {target.name}: its temporaries (activations and working buffers) need '
            f'{size(temporaries)} per device besides the {size(state)} of the train state, and a device has '
            f'{size(available)}; {REMEDY}')
  vmem = re.search(r'Scoped allocation with size ([\d.]+\w?) and limit ([\d.]+\w?)', message)
  if vmem:
    return (f'{name} does not compile for {target.name}: a Pallas kernel asks {vmem[1]} of a core\'s VMEM, '
            f'whose limit is {vmem[2]}; set --config.loss.impl=xla or smaller --config.loss.block_tokens and '
            '--config.loss.block_vocab')
  return f'{name} does not fit on {target.name}: {message.strip().splitlines()[0]}; {REMEDY}'


def report_compiled(name: str, executable: jax.stages.Compiled, config: ml_collections.ConfigDict,
                    devices: list, say) -> dict:
  """Prints a compiled step's memory and FLOPs; returns them."""
  n_devices = len(devices)
  memory = executable.memory_analysis()
  need = needed_bytes(memory)
  say(f'{name}: {size(need)} per device = arguments {size(memory.argument_size_in_bytes)} + temporaries '
      f'{size(memory.temp_size_in_bytes)} + outputs {size(memory.output_size_in_bytes)} - donated '
      f'{size(memory.alias_size_in_bytes)} + generated code {size(memory.generated_code_size_in_bytes)}')
  cost = executable.cost_analysis()
  xla_flops = cost.get('flops') if isinstance(cost, dict) else None
  model_cfg = ModelConfig(**config.model)
  model_flops = flops_per_token(model_cfg, config.data.seq_len) * config.data.global_batch_size * config.data.seq_len
  say(f'{name}: FLOPs per step: model {model_flops:.3g} ({flops_per_token(model_cfg, config.data.seq_len):.3g} '
      f'per token); ' + (f'XLA {xla_flops:.3g} per device, {xla_flops * n_devices:.3g} on {n_devices} devices (the '
                          'body of a loop counted once, Pallas kernels left out)'
                         if xla_flops else 'XLA gives no count here'))
  return {'need_bytes': need, 'xla_flops_per_device': xla_flops}


def predict(name: str, config: ml_collections.ConfigDict, teacher: ModelConfig | None, target: Target,
            say) -> dict:
  """The least time a step can take on these devices: all its FLOPs at the peak.

  Its FLOPs are the model's (6 per parameter per token, attention counted whole) plus
  what the remat policy recomputes, plus the teacher's forward pass in stage 1. They
  are counted from the model, not from XLA's compiled costs: those count the body of a
  loop once (the scan over layers, the loss's scan over chunks) and leave out the Pallas
  kernels. Communication and the kernels' efficiency come on top of the bound.
  """
  student, L = ModelConfig(**config.model), config.data.seq_len
  per_token = flops_per_token(student, L) + recompute_flops_per_token(student, L)
  if teacher:
    per_token += flops_per_token(teacher, L) / 3
  tokens = config.data.global_batch_size * L
  capacity = peak_flops(target.devices[0]) * len(target.devices)
  seconds = per_token * tokens / capacity
  steps = config.salt.n_kd if name.startswith('stage 1') else config.total_steps - (
      config.salt.n_kd if name.startswith('stage 2') else 0)
  mfu = flops_per_token(student, L) / per_token
  say(f'{name}: a step takes at least {seconds * 1e3:.1f} ms on {target.name} ({per_token * tokens:.3g} FLOPs '
      f'with recomputation{" and the teacher" if teacher else ""}, at the peak), so MFU at most {mfu:.1%}; its '
      f'{steps:,} steps take at least {seconds * steps / 3600:,.1f} hours')
  return {'min_step_seconds': seconds, 'max_mfu': mfu, 'min_hours': seconds * steps / 3600}


def time_steps(executable, state, batch, extra: tuple, steps: int) -> tuple[step.TrainState, dict]:
  """One warm-up step (buffers allocated, caches warm), then `steps` timed ones."""
  state, metrics = executable(state, batch, *extra)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = executable(state, batch, *extra)
  loss = float(jax.device_get(metrics['loss']))
  return state, {'step_seconds': (time.perf_counter() - start) / steps, 'loss': loss}


def throughput(step_seconds: float, model_flops: float, tokens: int, devices: list) -> dict:
  peak = peak_flops(devices[0])
  return {'tokens_per_sec': tokens / step_seconds,
          'mfu': model_flops / step_seconds / (peak * len(devices)) if peak else None}


def save_and_restore(state: step.TrainState, abstract_state, config: ml_collections.ConfigDict,
                     workdir: Path | None, say) -> int:
  """Saves `state`, restores it and checks every array came back bit for bit; returns the step."""
  scratch = None if workdir else Path(tempfile.mkdtemp(prefix='salt-dryrun-'))
  directory = epath.Path(workdir or scratch) / 'checkpoints'
  if directory.exists() and any(p.name.isdigit() for p in directory.iterdir()):
    raise UserError(f'{directory} holds checkpoints; give the dry run a --workdir of its own')
  saved_step = int(state.step)
  checkpoints = checkpoint.Checkpoints(directory, every_steps=1, max_to_keep=1)
  try:
    checkpoints.save(saved_step, state, {'dryrun': True, 'config': config.to_dict()})
    checkpoints.wait()
    restored, _ = checkpoints.restore(abstract_state, 'auto')
  finally:
    checkpoints.close()
    if scratch:
      shutil.rmtree(scratch, ignore_errors=True)
  differing = [jax.tree_util.keystr(path) for (path, saved), back in
               zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(restored)) if not _same(saved, back)]
  if differing or int(restored.step) != saved_step:
    raise UserError(f'the checkpoint restored other values than were saved: {", ".join(differing[:5]) or "step"}')
  say(f'checkpoint: saved step {saved_step} to {directory}, restored it: bitwise equal '
      f'({len(jax.tree.leaves(state))} arrays)')
  return saved_step


def _same(a: jax.Array, b: jax.Array) -> bool:
  """Bitwise equality of this process's shards (every process checks its own)."""
  return a.dtype == b.dtype and a.shape == b.shape and all(
      np.asarray(x.data).tobytes() == np.asarray(y.data).tobytes()
      for x, y in zip(sorted(a.addressable_shards, key=lambda s: s.device.id),
                      sorted(b.addressable_shards, key=lambda s: s.device.id)))
