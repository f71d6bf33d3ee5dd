"""lm-evaluation-harness's own harness on a salt export, with a task defined from a local
JSONL file (no hub): salt's log-likelihoods and accuracy on the same task and model are
lm-eval's."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.hf import requires_hf

pytestmark = requires_hf
TASK = 'salt_parity'
DOCUMENTS = [
    {'context': 'The king said', 'choices': [' hello', ' goodbye there', ' no, my lord'], 'gold': 1},
    {'context': 'To be or not ', 'choices': ['to be', 'the end', 'café 1234'], 'gold': 0},
    {'context': 'Naïve café —', 'choices': [' 東京', ' crowns and two spaces', '\ttabs'], 'gold': 2},
    {'context': 'An indented line\n\n ', 'choices': ['after a blank one.', 'before'], 'gold': 0},
]


def write_task(directory: Path) -> Path:
  """The task's JSONL, and lm-eval's YAML for it: context and choice joined as they are."""
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / f'{TASK}.jsonl'
  path.write_text('\n'.join(json.dumps(d, ensure_ascii=False) for d in DOCUMENTS) + '\n')
  (directory / f'{TASK}.yaml').write_text(
      f'task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n'
      'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
      'doc_to_target: "{{gold}}"\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
  return path


def lm_eval_results(exported: Path, task_dir: Path) -> tuple[dict, list[list[float]]]:
  """lm-eval's metrics and each document's log-likelihood per choice, on CPU in float32."""
  os.environ.update(HF_DATASETS_OFFLINE='1', HF_HUB_OFFLINE='1')
  import lm_eval
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager

  model = HFLM(pretrained=str(exported), device='cpu', batch_size=4, dtype='float32', use_kernels=False)
  out = lm_eval.simple_evaluate(model=model, tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)),
                                num_fewshot=0, log_samples=True)
  samples = sorted(out['samples'][TASK], key=lambda s: s['doc_id'])
  return out['results'][TASK], [[float(ll) for ll, _ in s['filtered_resps']] for s in samples]


def salt_scores(checkpoint: str, task: Path, tokenizer: Path) -> tuple[dict, list[list[float]]]:
  """salt's in-run task evaluation (train.open_tasks, as `salt eval` runs it) on a checkpoint:
  the metrics and each document's log-likelihood per choice."""
  import jax
  import ml_collections
  from flax import nnx

  from trainer import step, train
  from trainer.checkpoint_files import checkpoint_tokenizer, read_checkpoint
  from trainer.config import defaults
  from trainer.model import ModelConfig

  meta, params = read_checkpoint(Path(checkpoint))
  config = ml_collections.ConfigDict({**meta, 'eval': {**defaults().eval.to_dict(), 'tasks': str(task)}})
  tok = checkpoint_tokenizer(Path(checkpoint), meta, tokenizer)
  program = train.build(config, train.make_mesh(config), tok.token_bytes())
  evaluator = train.open_tasks(config, program, tok)
  _, state = step.abstract_model(ModelConfig(**config.model))
  nnx.replace_by_pure_dict(state, params)
  state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, program.abstract_state.params))
  return evaluator(state)[TASK], [[float(x) for x in ll] for ll, _ in evaluator.scores(state)[0]]


@pytest.mark.parametrize('name', ['llama3', 'gemma3'])
def test_salt_s_task_scores_are_lm_eval_s_on_the_export(zoo, name, tmp_path):
  """Same log-likelihood per choice (salt computing in float32, as lm-eval does here), so
  the same acc and acc_norm."""
  from tests.hf.test_score import float32_teacher

  task = write_task(tmp_path / 'task')
  want_metrics, want = lm_eval_results(zoo.exported(name), tmp_path / 'task')
  got_metrics, got = salt_scores(float32_teacher(zoo.teacher(name), tmp_path), task, zoo.exported(name))
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
  assert got_metrics['acc'] == want_metrics['acc,none'] and got_metrics['acc_norm'] == want_metrics['acc_norm,none']
