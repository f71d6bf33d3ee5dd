"""`salt demo` (what `make demo` runs): the whole SALT method on the embedded corpus.

  1. train the small model (SLM)                           configs/demo.py:slm
  2. score every training record with it (SALT_DS)         salt score
  3. train the student as a plain baseline                 configs/demo.py
  4. train the same student with SALT for the same steps   configs/demo.py:salt
  5. compare them: report.md, val_loss_vs_steps.png, val_loss_vs_time.png

Every evaluation also scores the few-shot tasks of eval.tasks (configs/demo.py: the
embedded corpus's next_line and next_speaker, trainer/corpus.py); the report gives
their accuracy beside the loss.

With --seeds N, steps 3 and 4 run for seeds 0..N-1 (the students' initialisation and
data order; the SLM and its scores are shared), and the report adds each seed's result,
the mean and sd of the final losses and the paired difference with its 95% interval.

Each stage is skipped when its output is complete (a run's last checkpoint, the
scores of this SLM), so an interrupted demo goes on where it stopped.
"""

import json
import logging
from collections.abc import Callable
from pathlib import Path

import ml_collections
import numpy as np
from matplotlib.figure import Figure

from configs import demo as demo_configs
from trainer import tasks
from trainer.model import ModelConfig, param_count
from trainer.score import describe, score
from trainer.train import default_data_dir, task_files, train

log = logging.getLogger('salt')


# Two-sided 95% quantiles of Student's t by degrees of freedom; beyond 30, the normal's.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}
# BENCHMARKS.md, "Demo": SALT - baseline in final validation loss over three seeds (mean, 95% interval).
THREE_SEEDS = (-0.0096, -0.139, 0.120)


def run_name(arm: str, seed: int) -> str:
  """Seed 0's runs keep the one-seed demo's names."""
  return arm if seed == 0 else f'{arm}-seed{seed}'


def seeded(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """The student of another seed: another initialisation and another order of the data."""
  if seed == 0:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.seed, config.data.shuffle_seed = seed, seed
  return config


def run(workdir: Path, get_config: Callable[[str | None], ml_collections.ConfigDict] = demo_configs.get_config,
        score_batch: int = 32, score_every: int = 4, seeds: int = 1) -> Path:
  """Runs the stages that are not done yet under `workdir`; returns the report's path.

  get_config(None | 'slm' | 'salt') gives the three runs' configs (configs/demo.py's);
  the SALT run's teacher and scores are set to those this demo writes. The SLM scores
  every `score_every`-th record: stage 1 needs a few hundred thousand tokens, and a
  quarter of the corpus leaves plenty to select from at a quarter of the time.
  """
  workdir = Path(workdir)
  slm, baseline, salt = get_config('slm'), get_config(None), get_config('salt')
  teacher = workdir / 'slm' / 'checkpoints' / str(slm.total_steps)
  scores = workdir / 'scores.npy'
  salt.salt.teacher, salt.data.selection.scores = str(teacher), str(scores)

  _train('1/4 the small model (SLM)', slm, workdir / 'slm')
  if _scored_by(scores, teacher):
    log.info('== 2/4 scores: done (%s)', scores)
  else:
    log.info('== 2/4 scoring every %d-th training record with the SLM', score_every)
    data_dir = Path(slm.data.path) if slm.data.path else default_data_dir(slm.model.vocab_size)
    log.info(describe(score(str(teacher), data_dir, batch_size=score_batch, every=score_every, output=scores)))
  for seed in range(seeds):
    of = f' (seed {seed} of {seeds})' if seeds > 1 else ''
    _train(f'3/4 the student, baseline{of}', seeded(baseline, seed), workdir / run_name('baseline', seed))
    _train(f'4/4 the student with SALT{of}', seeded(salt, seed), workdir / run_name('salt', seed))
  report = write_report(workdir, salt, slm, seeds)
  log.info('report: %s', report)
  return report


def _train(title: str, config: ml_collections.ConfigDict, run_dir: Path) -> None:
  if (run_dir / 'checkpoints' / str(config.total_steps)).is_dir():
    log.info('== %s: done (%s)', title, run_dir)
    return
  log.info('== %s: %s', title, run_dir)
  train(config, run_dir)


def _scored_by(scores: Path, teacher: Path) -> bool:
  summary = scores.with_suffix('.json')
  return scores.is_file() and summary.is_file() and json.loads(summary.read_text())['teacher'] == str(teacher)


def eval_curve(run_dir: Path) -> dict[str, np.ndarray]:
  """Step, training seconds, validation loss and each task's accuracy (by task name; NaN
  where not scored) at each evaluation of a run."""
  rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  # A resumed run appends; a step logged twice keeps its last record.
  rows = list({r['step']: r for r in rows if 'eval_loss' in r}.values())
  curve = {k: np.array([r[m] for r in rows], float)
           for k, m in (('step', 'step'), ('seconds', 'train_seconds'), ('loss', 'eval_loss'))}
  accuracies = sorted({k for r in rows for k in r if k.startswith('tasks/') and k.endswith('/acc')})
  curve.update({k.split('/')[1]: np.array([r.get(k, np.nan) for r in rows], float) for k in accuracies})
  return curve


def task_names(curve: dict[str, np.ndarray]) -> list[str]:
  return [k for k in curve if k not in ('step', 'seconds', 'loss')]


def noise_lines(config: ml_collections.ConfigDict, names: list[str], accuracy: dict[str, float]) -> list[str]:
  """What one seed can tell: the three-seed interval of the loss, each accuracy's sampling error."""
  mean, low, high = THREE_SEEDS
  counts = {t.name: len(t.examples) for t in tasks.read_tasks(task_files(tasks.names(config.eval.tasks)))}
  errors = [f'{name} {np.sqrt(accuracy[name] * (1 - accuracy[name]) / counts[name]):.3f} ({counts[name]} examples)'
            for name in names if name in counts]
  return [
      f'One seed: a difference in final loss smaller than the three-seed interval in BENCHMARKS.md (paired '
      f'difference {mean:+.4f}, 95% interval [{low:+.3f}, {high:+.3f}] nats/token) is within seed noise, and says '
      'nothing of which method is better.'
      + (f' Each accuracy is the share right of its task\'s examples, with a (binomial) standard error of about '
         f'{", ".join(errors)}: differences of that size are noise too.' if errors else ''), '']


def first_reach(x: np.ndarray, loss: np.ndarray, target: float) -> float | None:
  """The x at which `loss` first falls to `target`, linear between evaluations; None if never."""
  hits = np.flatnonzero(loss <= target)
  if not hits.size:
    return None
  i = hits[0]
  if i == 0:
    return float(x[0])
  fraction = (loss[i - 1] - target) / (loss[i - 1] - loss[i])
  return float(x[i - 1] + fraction * (x[i] - x[i - 1]))


def write_report(workdir: Path, salt: ml_collections.ConfigDict, slm: ml_collections.ConfigDict,
                 seeds: int = 1) -> Path:
  """report.md and the two plots, from the runs' metrics."""
  curves = {arm: [eval_curve(workdir / run_name(arm, seed)) for seed in range(seeds)] for arm in ('baseline', 'salt')}
  base, kd = curves['baseline'][0], curves['salt'][0]
  target = base['loss'][-1]
  at_step = first_reach(kd['step'], kd['loss'], target)
  at_seconds = first_reach(kd['seconds'], kd['loss'], target)
  teacher_curve = eval_curve(workdir / 'slm')
  slm_loss = teacher_curve['loss'][-1]
  scored = json.loads((workdir / 'scores.json').read_text())
  selected = json.loads((workdir / 'salt' / 'config.json').read_text())['selection']
  n_kd, total = salt.salt.n_kd, salt.total_steps
  names = task_names(base)
  accuracy_head = ''.join(f' {n} acc |' for n in names)
  _plot(curves, 'step', 'step', n_kd, slm_loss, workdir / 'val_loss_vs_steps.png')
  _plot(curves, 'seconds', 'training seconds (evaluation excluded)', None, slm_loss,
        workdir / 'val_loss_vs_time.png')

  if at_step is None:
    verdict = (f'SALT does **not** reach the baseline\'s final validation loss ({target:.4f}) within '
               f'{total} steps: it ends at {kd["loss"][-1]:.4f} ({kd["loss"][-1] - target:+.4f} nats/token).')
  else:
    verdict = (f'SALT reaches the baseline\'s final validation loss ({target:.4f}) at step {at_step:.0f} '
               f'of {total} ({at_step / total:.0%} of the steps) and after {at_seconds:.0f} s of training '
               f'({at_seconds / base["seconds"][-1]:.0%} of the baseline\'s {base["seconds"][-1]:.0f} s); '
               f'it ends at {kd["loss"][-1]:.4f} ({kd["loss"][-1] - target:+.4f} nats/token).')
  lines = [
      '# SALT demo report', '',
      *([f'Seed 0 of {seeds} first; all seeds after its table.', ''] if seeds > 1 else []),
      f'Student {_describe(salt)}, {total} steps; the SLM ({_describe(slm)}) '
      f'teaches it for the first {n_kd} steps (w = {salt.salt.weight}, {salt.salt.schedule}, tau = {salt.salt.tau}) '
      f'on the {selected["records"]} training records it scores highest ({salt.data.selection.rule} '
      f'{salt.data.selection.keep_fraction:.0%} of the {scored["scored"]} it scored: every {scored["every"]}th '
      f'of {selected["of"]}).', '',
      verdict, '',
      f'| run | final validation loss (nats/token) |{accuracy_head} training seconds |',
      '|---|---|' + '---|' * len(names) + '---|',
      *(f'| {run} | {c["loss"][-1]:.4f} |{_accuracies(c, names)} {c["seconds"][-1]:.0f} |'
        for run, c in (('SLM (teacher)', teacher_curve), ('baseline', base), ('SALT', kd))), '',
      *(noise_lines(salt, names, {n: kd[n][-1] for n in names}) if seeds == 1 else []),
      f'The SLM\'s training and the scoring ({scored["seconds"]:.0f} s) are not in the students\' seconds: '
      'they are paid once per SLM, whatever the number of students it teaches.', '',
      '| step | baseline loss | SALT loss |' + ''.join(f' baseline {n} acc | SALT {n} acc |' for n in names),
      '|---|---|---|' + '---|---|' * len(names),
      *(f'| {s:.0f} | {base["loss"][i]:.4f} | {kd["loss"][i]:.4f} |'
        + ''.join(f' {_accuracy(base[n][i])} | {_accuracy(kd[n][i])} |' for n in names)
        for i, s in enumerate(base['step'])), '',
      *(seed_lines(curves, total) if seeds > 1 else []),
      '![validation loss against steps](val_loss_vs_steps.png)',
      '![validation loss against training time](val_loss_vs_time.png)', '',
  ]
  report = workdir / 'report.md'
  report.write_text('\n'.join(lines))
  return report


def _accuracy(value: float) -> str:
  return 'n/a' if np.isnan(value) else f'{value:.3f}'


def _accuracies(curve: dict[str, np.ndarray], names: list[str]) -> str:
  """The last accuracy each task has in `curve` (the SLM's runs may score no task)."""
  return ''.join(f' {_accuracy(curve[n][-1]) if n in curve else "n/a"} |' for n in names)


def paired_difference(salt_final: np.ndarray, baseline_final: np.ndarray) -> tuple[float, float, float]:
  """Mean of SALT - baseline over seeds and its 95% interval (Student's t on the pairs)."""
  d = salt_final - baseline_final
  n = d.size
  half = T_975.get(n - 1, 1.960) * d.std(ddof=1) / np.sqrt(n)
  return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def seed_lines(curves: dict, total: int) -> list[str]:
  """The report's section on several seeds."""
  base = np.array([c['loss'][-1] for c in curves['baseline']])
  kd = np.array([c['loss'][-1] for c in curves['salt']])
  reach = [first_reach(k['step'], k['loss'], b['loss'][-1]) for b, k in zip(curves['baseline'], curves['salt'])]
  mean, low, high = paired_difference(kd, base)
  return [
      f'## {base.size} seeds', '',
      'Each seed initialises both students and orders the data its own way; the SLM and its scores are shared.', '',
      '| seed | baseline | SALT | SALT - baseline | SALT reaches the baseline\'s final loss at |', '|---|---|---|---|---|',
      *(f'| {s} | {b:.4f} | {k:.4f} | {k - b:+.4f} | {"step %.0f (%.0f%%)" % (r, 100 * r / total) if r else "never"} |'
        for s, (b, k, r) in enumerate(zip(base, kd, reach))), '',
      f'Final validation loss, mean ± sd over seeds: baseline {base.mean():.4f} ± {base.std(ddof=1):.4f}, '
      f'SALT {kd.mean():.4f} ± {kd.std(ddof=1):.4f}.', '',
      f'Paired difference SALT - baseline: {mean:+.4f} nats/token, 95% interval [{low:+.4f}, {high:+.4f}] '
      f'({"SALT is lower" if high < 0 else "SALT is higher" if low > 0 else "no difference resolved"} at this '
      'number of seeds).', '',
  ]


def _describe(config: ml_collections.ConfigDict) -> str:
  m = config.model
  return f'{param_count(ModelConfig(**m)) / 1e6:.1f}M parameters, d_model {m.d_model}, {m.n_layers} layers'


def _plot(curves: dict, x: str, xlabel: str, n_kd: int | None, slm_loss: float, path: Path) -> None:
  fig = Figure(figsize=(6, 4), dpi=120)
  ax = fig.subplots()
  for (name, runs), color in zip(curves.items(), ('tab:blue', 'tab:orange')):
    label = {'salt': 'SALT'}.get(name, name)
    if len(runs) > 1:  # each seed faint, their mean bold
      for curve in runs:
        ax.plot(curve[x], curve['loss'], color=color, alpha=0.25, linewidth=0.8)
      label += f', mean of {len(runs)} seeds'
    ax.plot(np.mean([c[x] for c in runs], axis=0), np.mean([c['loss'] for c in runs], axis=0), marker='.',
            color=color, label=label)
  ax.axhline(slm_loss, color='grey', linestyle=':', label='SLM (teacher), final')
  if n_kd:
    ax.axvline(n_kd, color='grey', linestyle='--', label='end of stage 1')
  ax.set(xlabel=xlabel, ylabel='validation loss (nats/token)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
