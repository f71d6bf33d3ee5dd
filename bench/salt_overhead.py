"""Step time of stage 1 (student + teacher forward + distillation loss) over stage 2 (student alone).

    python -m bench.salt_overhead [--student configs/demo.py] [--teacher configs/demo.py:slm] [--steps 10]
        [--config.KEY=VALUE ...]      (overrides of the student's config)

Both models start from random parameters (the step's cost does not depend on their
values) and read random tokens. The goal: stage-1 overhead <= the teacher's share of
the FLOPs (its forward pass over the student's training FLOPs) + 3%.
"""

import argparse
import time

import jax
import numpy as np

from bench.results import record
from trainer import config as config_lib
from trainer import dryrun, salt, sharding, train
from trainer.config import mesh_shape
from trainer.model import ModelConfig, flops_per_token


def time_steps(fn, state, args, steps):
  state, metrics = fn(state, *args)  # compile
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = fn(state, *args)
  jax.block_until_ready(metrics)
  return state, (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--student', default='configs/demo.py')
  parser.add_argument('--teacher', default='configs/demo.py:slm')
  parser.add_argument('--steps', type=int, default=10)
  args, overrides = parser.parse_known_args()
  student = config_lib.load(args.student, ['--config.salt.n_kd=1000000', '--config.total_steps=1000000',
                                           *overrides])
  teacher_config = config_lib.load(args.teacher)
  config_lib.validate(student, jax.device_count())
  mesh = sharding.make_mesh(mesh_shape(student.mesh, jax.device_count()))
  rules = sharding.parse_rules(student.sharding)
  s_cfg, t_cfg = ModelConfig(**student.model), ModelConfig(**teacher_config.model)
  program = train.build(student, mesh, np.ones(s_cfg.vocab_size, np.int32))
  teacher = dryrun.random_teacher(salt.abstract_teacher(t_cfg, mesh, rules), seed=1)
  batch = sharding.host_batch_to_global(
      dryrun.random_batch(student.data.global_batch_size, student.data.seq_len, s_cfg.vocab_size, seed=0),
      program.batch_sharding)
  state = program.init(0)
  state, stage2_s = time_steps(program.train_step, state, (batch,), args.steps)
  state, stage1_s = time_steps(program.distillation_step(teacher), state, (batch, teacher.params), args.steps)
  seq_len = student.data.seq_len
  teacher_share = flops_per_token(t_cfg, seq_len) / 3 / flops_per_token(s_cfg, seq_len)
  record('salt_overhead', round(stage1_s / stage2_s - 1, 4), student=args.student, teacher=args.teacher,
         overrides=overrides, stage1_step_s=round(stage1_s, 4), stage2_step_s=round(stage2_s, 4),
         teacher_flops_share=round(teacher_share, 4), goal=round(teacher_share + 0.03, 4))


if __name__ == '__main__':
  main()
