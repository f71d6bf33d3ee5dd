"""`salt demo` (what `make demo` runs): the whole SALT method on the embedded corpus.

  1. train the small model (SLM)                           configs/demo.py:slm
  2. score every training record with it (SALT_DS)         salt score
  3. train the student as a plain baseline                 configs/demo.py
  4. train the same student with SALT for the same steps   configs/demo.py:salt
  5. compare them: report.md, val_loss_vs_steps.png, val_loss_vs_time.png

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
from trainer.model import ModelConfig, param_count
from trainer.score import describe, score
from trainer.train import default_data_dir, train

log = logging.getLogger('salt')


def run(workdir: Path, get_config: Callable[[str | None], ml_collections.ConfigDict] = demo_configs.get_config,
        score_batch: int = 32, score_every: int = 4) -> Path:
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
  _train('3/4 the student, baseline', baseline, workdir / 'baseline')
  _train('4/4 the student with SALT', salt, workdir / 'salt')
  report = write_report(workdir, salt, slm)
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
  """Step, training seconds and validation loss at each evaluation of a run."""
  rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  # A resumed run appends; a step logged twice keeps its last record.
  rows = list({r['step']: r for r in rows if 'eval_loss' in r}.values())
  return {k: np.array([r[m] for r in rows], float)
          for k, m in (('step', 'step'), ('seconds', 'train_seconds'), ('loss', 'eval_loss'))}


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


def write_report(workdir: Path, salt: ml_collections.ConfigDict, slm: ml_collections.ConfigDict) -> Path:
  """report.md and the two plots, from the runs' metrics."""
  curves = {name: eval_curve(workdir / name) for name in ('baseline', 'salt')}
  base, kd = curves['baseline'], curves['salt']
  target = base['loss'][-1]
  at_step = first_reach(kd['step'], kd['loss'], target)
  at_seconds = first_reach(kd['seconds'], kd['loss'], target)
  teacher_curve = eval_curve(workdir / 'slm')
  slm_loss = teacher_curve['loss'][-1]
  scored = json.loads((workdir / 'scores.json').read_text())
  selected = json.loads((workdir / 'salt' / 'config.json').read_text())['selection']
  n_kd, total = salt.salt.n_kd, salt.total_steps
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
      f'Student {_describe(salt)}, {total} steps; the SLM ({_describe(slm)}) '
      f'teaches it for the first {n_kd} steps (w = {salt.salt.weight}, {salt.salt.schedule}, tau = {salt.salt.tau}) '
      f'on the {selected["records"]} training records it scores highest ({salt.data.selection.rule} '
      f'{salt.data.selection.keep_fraction:.0%} of the {scored["scored"]} it scored: every {scored["every"]}th '
      f'of {selected["of"]}).', '',
      verdict, '',
      '| run | final validation loss (nats/token) | training seconds |', '|---|---|---|',
      f'| SLM (teacher) | {slm_loss:.4f} | {teacher_curve["seconds"][-1]:.0f} |',
      f'| baseline | {base["loss"][-1]:.4f} | {base["seconds"][-1]:.0f} |',
      f'| SALT | {kd["loss"][-1]:.4f} | {kd["seconds"][-1]:.0f} |', '',
      f'The SLM\'s training and the scoring ({scored["seconds"]:.0f} s) are not in the students\' seconds: '
      'they are paid once per SLM, whatever the number of students it teaches.', '',
      '| step | baseline | SALT |', '|---|---|---|',
      *(f'| {s:.0f} | {b:.4f} | {k:.4f} |' for s, b, k in zip(base['step'], base['loss'], kd['loss'])), '',
      '![validation loss against steps](val_loss_vs_steps.png)',
      '![validation loss against training time](val_loss_vs_time.png)', '',
  ]
  report = workdir / 'report.md'
  report.write_text('\n'.join(lines))
  return report


def _describe(config: ml_collections.ConfigDict) -> str:
  m = config.model
  return f'{param_count(ModelConfig(**m)) / 1e6:.1f}M parameters, d_model {m.d_model}, {m.n_layers} layers'


def _plot(curves: dict, x: str, xlabel: str, n_kd: int | None, slm_loss: float, path: Path) -> None:
  fig = Figure(figsize=(6, 4), dpi=120)
  ax = fig.subplots()
  for name, curve in curves.items():
    ax.plot(curve[x], curve['loss'], marker='.', label={'salt': 'SALT'}.get(name, name))
  ax.axhline(slm_loss, color='grey', linestyle=':', label='SLM (teacher), final')
  if n_kd:
    ax.axvline(n_kd, color='grey', linestyle='--', label='end of stage 1')
  ax.set(xlabel=xlabel, ylabel='validation loss (nats/token)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
