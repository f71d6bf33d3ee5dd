"""Evaluation tasks: few-shot accuracy on local JSONL files, scored as lm-evaluation-harness scores it.

A task is a .jsonl file of one example a line, all of one kind:

  {"context": "The king", "choices": [" is dead", " sings"], "gold": 0}     multiple choice
  {"context": "To be, or not", "continuation": " to be"}                   completion

A line with "fewshot": true is not scored: such lines are the pool of demonstrations.
With k shots (eval.task_shots), example i's prompt is k demonstrations drawn from the
pool by random.Random(i).sample, each its context followed by its answer (the gold
choice, or the continuation), joined by eval.task_separator ("\n\n") before the
example's context. The task's name is the file's stem.

Metrics, per task:
  multiple choice  acc (the choice of highest log-likelihood is the gold one) and
                   acc_norm (the same with each log-likelihood divided by the
                   choice's length in characters), means over the examples
  completion       ll_per_token and ll_per_byte (the continuations' summed
                   log-likelihood over their tokens, over their UTF-8 bytes) and
                   greedy (the share of examples whose every continuation token is
                   the model's most likely one)

The conventions of lm-evaluation-harness 0.4.13 that salt follows, as read in its source:
  - A choice is the continuation as written: salt's target_delimiter is "" (the
    continuation of a request is f"{target_delimiter}{choice}",
    lm_eval/api/task.py ConfigurableTask.construct_requests), so a choice carries its
    own leading space.
  - Few-shot prompts: each demonstration is its text, the target delimiter, its answer
    and the few-shot delimiter, then the example's text (ConfigurableTask.fewshot_context
    and build_qa_turn). lm-eval draws demonstrations with its own sampler
    (lm_eval/api/samplers.py ContextSampler, one Random for the task); salt draws them
    by the example's index, so few-shot scores match lm-eval's given the same
    demonstrations, and at k = 0 always.
  - Encoding (lm_eval/api/model.py TemplateLM._encode_pair): whitespace that ends the
    context moves to the start of the continuation; the ids of the pair are
    encode(context + continuation), of which the continuation's are those after
    len(encode(context)) (a causal model's; only seq2seq models encode the two apart).
  - An empty context (TemplateLM.loglikelihood) is the prefix token alone
    (lm_eval/models/huggingface.py HFLM.prefix_token_id: BOS, else EOS), or the
    continuation's first token where that is the prefix token. salt also takes a
    context of whitespace alone this way, its whitespace moved to the continuation
    (lm-eval's assertion fails on one).
  - No BOS: salt's documents never begin with one, and its export tells transformers to
    add none (HFLM.tok_encode then adds none).
  - The model reads (context + continuation)[-(seq_len + 1):][:-1], one request per row
    (HFLM._loglikelihood_tokens; its max_length is the export's max_position_embeddings,
    data.seq_len, by lm_eval/models/utils.py resolve_max_length); the log-likelihood is the sum of log_softmax over the
    continuation's tokens (lm-eval's in the model's dtype, float32 for salt's export by
    default; salt's in float32), and is_greedy holds when the argmax is the token at
    every one of them.
  - acc = argmax of the log-likelihoods, acc_norm = argmax of the log-likelihoods over
    len(choice) in characters (ConfigurableTask.process_results: completion_len), ties
    to the first choice (np.argmax). A completion's greedy is the mean of is_greedy,
    what process_results reports as acc for a loglikelihood task.
Where salt differs: a tie between the target's logit and another token's counts as
greedy (torch's argmax takes the first index); lm-eval's bits_per_byte is a rolling
log-likelihood task, salt's ll_per_byte that of a completion.
"""

import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding

from trainer import sharding
from trainer.errors import UserError
from trainer.tokenizer import Tokenizer

MULTIPLE_CHOICE = frozenset({'context', 'choices', 'gold'})
COMPLETION = frozenset({'context', 'continuation'})
FEWSHOT = 'fewshot'


@dataclasses.dataclass(frozen=True)
class Example:
  line: int  # in the file, from 1
  context: str
  choices: tuple[str, ...]  # a completion's continuation alone
  gold: int | None  # None: a completion

  @property
  def answer(self) -> str:
    """What a demonstration shows after its context."""
    return self.choices[0 if self.gold is None else self.gold]


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  path: Path
  examples: tuple[Example, ...]  # scored
  fewshot: tuple[Example, ...]  # the pool of demonstrations

  @property
  def completion(self) -> bool:
    return self.examples[0].gold is None


def names(setting: str | Sequence[str]) -> list[str]:
  """eval.tasks as a list: comma-separated, or a list already."""
  entries = setting.split(',') if isinstance(setting, str) else setting
  return [str(e).strip() for e in entries if str(e).strip()]


def read_task(path: str | Path) -> Task:
  """The task in a .jsonl file. Raises UserError naming the file and line of a mistake."""
  path = Path(path)
  try:
    text = path.read_text(encoding='utf-8')
  except FileNotFoundError:
    raise UserError(f'task file {path} does not exist') from None
  except (IsADirectoryError, UnicodeDecodeError) as e:
    raise UserError(f'task file {path} cannot be read as UTF-8 text ({e})') from None
  scored, pool, kind = [], [], None
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    example, fewshot, keys = _example(line, f'{path}:{number}', number)
    if kind is not None and keys != kind:
      raise UserError(f'{path}:{number}: a {_kind_name(keys)} example in a {_kind_name(kind)} task; '
                      'a task holds one kind')
    kind = keys
    (pool if fewshot else scored).append(example)
  if not scored:
    raise UserError(f'task file {path} has no scored examples (lines without "fewshot": true)')
  return Task(name=path.stem, path=path, examples=tuple(scored), fewshot=tuple(pool))


def read_tasks(paths: Sequence[str | Path]) -> list[Task]:
  """The tasks of these files; two of one name (their files' stem) are refused."""
  tasks = [read_task(p) for p in paths]
  seen = {}
  for task in tasks:
    if task.name in seen:
      raise UserError(f'task files {seen[task.name]} and {task.path} have the same name {task.name!r} '
                      '(a task is named by its file\'s stem); rename one')
    seen[task.name] = task.path
  return tasks


def _kind_name(keys: frozenset) -> str:
  return 'completion' if keys == COMPLETION else 'multiple-choice'


def _example(line: str, where: str, number: int) -> tuple[Example, bool, frozenset]:
  """One line's example, whether it is a demonstration, and its kind (its keys)."""
  try:
    record = json.loads(line)
  except ValueError as e:
    raise UserError(f'{where}: not JSON ({e})') from None
  if not isinstance(record, dict):
    raise UserError(f'{where}: not a JSON object')
  fewshot = record.pop(FEWSHOT, False)
  if not isinstance(fewshot, bool):
    raise UserError(f'{where}: "fewshot" must be true or false, not {fewshot!r}')
  keys = MULTIPLE_CHOICE if 'choices' in record or 'gold' in record else COMPLETION
  missing, extra = sorted(keys - record.keys()), sorted(record.keys() - keys)
  if missing or extra:
    raise UserError(f'{where}: ' + '; '.join(
        ([f'missing {", ".join(map(repr, missing))}'] if missing else [])
        + ([f'unknown {", ".join(map(repr, extra))}'] if extra else []))
        + f' (a {_kind_name(keys)} example has {", ".join(sorted(keys))}, and optionally "fewshot")')
  context = record['context']
  if not isinstance(context, str):
    raise UserError(f'{where}: "context" must be a string, not {type(context).__name__}')
  if keys == COMPLETION:
    return Example(number, context, (_text(record['continuation'], 'continuation', where),), None), fewshot, keys
  choices, gold = record['choices'], record['gold']
  if not isinstance(choices, list) or not choices:
    raise UserError(f'{where}: "choices" must be a non-empty list of strings')
  choices = tuple(_text(c, f'choice {i}', where) for i, c in enumerate(choices))
  if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
    raise UserError(f'{where}: "gold" must be the index of the right choice, 0..{len(choices) - 1}, not {gold!r}')
  return Example(number, context, choices, gold), fewshot, keys


def _text(value, name: str, where: str) -> str:
  """A string that is scored: it must have at least one character."""
  if not isinstance(value, str) or not value:
    raise UserError(f'{where}: {name} must be a non-empty string, not {value!r}')
  return value


def prompt(task: Task, index: int, shots: int, separator: str) -> str:
  """Scored example `index`'s context behind `shots` demonstrations drawn by its index."""
  demonstrations = random.Random(index).sample(task.fewshot, shots)
  return separator.join([d.context + d.answer for d in demonstrations] + [task.examples[index].context])


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[np.ndarray, np.ndarray]:
  """The ids of a request's context and of its continuation, as lm-eval's _encode_pair."""
  kept = context.rstrip()
  context, continuation = kept, context[len(kept):] + continuation
  if not context:
    (ids,) = tokenizer.encode([continuation])
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    return (ids[:1], ids[1:]) if ids.size and ids[0] == prefix else (np.array([prefix], np.int32), ids)
  whole, context_ids = tokenizer.encode([context + continuation, context])
  return context_ids, whole[context_ids.size:]


@dataclasses.dataclass(frozen=True)
class Request:
  tokens: np.ndarray  # the context's ids then the continuation's, the last seq_len + 1 of them
  scored: int  # how many of the last tokens are the continuation's
  bytes: int  # the continuation's UTF-8 bytes, as the file writes it


def requests(task: Task, tokenizer: Tokenizer, seq_len: int, shots: int, separator: str) -> list[list[Request]]:
  """Each scored example's requests, one per choice."""
  if shots > len(task.fewshot):
    raise UserError(f'{task.path} has {len(task.fewshot)} few-shot examples ("fewshot": true lines), fewer than the '
                    f'{shots} shots asked for (eval.task_shots, salt eval --shots)')
  out = []
  for index, example in enumerate(task.examples):
    context = prompt(task, index, shots, separator)
    per_choice = []
    for choice in example.choices:
      context_ids, continuation_ids = encode_pair(tokenizer, context, choice)
      where = f'{task.path}:{example.line}'
      if not continuation_ids.size:
        raise UserError(f'{where}: {choice!r} adds no token to its context (the tokenizer merges it into the '
                        'context\'s last token); end the context at a word boundary')
      if continuation_ids.size > seq_len:
        raise UserError(f'{where}: {choice!r} is {continuation_ids.size} tokens, more than the model\'s '
                        f'data.seq_len={seq_len}')
      tokens = np.concatenate([context_ids, continuation_ids])[-(seq_len + 1):].astype(np.int32)
      per_choice.append(Request(tokens, int(continuation_ids.size), len(choice.encode('utf-8'))))
    out.append(per_choice)
  return out


def row(request: Request | None, seq_len: int) -> dict[str, np.ndarray]:
  """One request as a row of the model's batch, right-padded; None: an empty row."""
  out = {'inputs': np.zeros(seq_len, np.int32), 'targets': np.zeros(seq_len, np.int32),
         'positions': np.arange(seq_len, dtype=np.int32), 'segment_ids': np.zeros(seq_len, np.int32),
         'weights': np.zeros(seq_len, np.float32)}
  if request is not None:
    n = request.tokens.size - 1
    out['inputs'][:n], out['targets'][:n] = request.tokens[:-1], request.tokens[1:]
    out['segment_ids'][:n] = 1
    out['weights'][n - request.scored:n] = 1.0
  return out


# (params, batch) -> per-token log-likelihood and greedy, [B, L], replicated (step.make_likelihood_step).
LikelihoodStep = Callable[..., tuple[jax.Array, jax.Array]]


class Evaluator:
  """Tasks encoded for one model, scored with its likelihood step: one request per row,
  `global_batch` rows at a time, each process building its rows of every batch."""

  def __init__(self, tasks: Sequence[Task], tokenizer: Tokenizer, *, seq_len: int, shots: int, separator: str,
               step: LikelihoodStep, batch_sharding: NamedSharding, global_batch: int):
    self.tasks = list(tasks)
    self.requests = [requests(t, tokenizer, seq_len, shots, separator) for t in self.tasks]
    self.seq_len, self.step, self.batch_sharding, self.global_batch = seq_len, step, batch_sharding, global_batch

  def __call__(self, params) -> dict[str, dict[str, float]]:
    """Each task's metrics, by task name."""
    return {t.name: metrics(t, r, s) for t, r, s in zip(self.tasks, self.requests, self.scores(params))}

  def scores(self, params) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per task, per scored example: each choice's log-likelihood (float64) and whether it is greedy."""
    flat = [r for per_task in self.requests for example in per_task for r in example]
    ll, greedy = self._score(params, flat)
    out, at = [], 0
    for per_task in self.requests:
      out.append([])
      for example in per_task:
        out[-1].append((ll[at:at + len(example)], greedy[at:at + len(example)]))
        at += len(example)
    return out

  def _score(self, params, flat: list[Request]) -> tuple[np.ndarray, np.ndarray]:
    """Each request's log-likelihood (float64) and whether it is greedy."""
    ll, greedy = np.zeros(len(flat)), np.zeros(len(flat), bool)
    per_process = self.global_batch // jax.process_count()
    mine = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    for first in range(0, len(flat), self.global_batch):
      batch = flat[first:first + self.global_batch]
      rows = [row(r, self.seq_len) for r in (batch + [None] * (self.global_batch - len(batch)))[mine]]
      host = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
      ll_BxL, greedy_BxL = jax.device_get(self.step(params, sharding.host_batch_to_global(host, self.batch_sharding)))
      for i, request in enumerate(batch):
        n = request.tokens.size - 1
        ll[first + i] = ll_BxL[i, n - request.scored:n].sum(dtype=np.float64)
        greedy[first + i] = greedy_BxL[i, n - request.scored:n].all()
    return ll, greedy


def metrics(task: Task, requests_: list[list[Request]],
            scores: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
  """A task's metrics from each example's requests, log-likelihoods and greedy flags (per choice)."""
  if task.completion:
    ll = sum(float(s[0][0]) for s in scores)
    return {'ll_per_token': ll / sum(r[0].scored for r in requests_),
            'll_per_byte': ll / sum(r[0].bytes for r in requests_),
            'greedy': float(np.mean([s[1][0] for s in scores]))}
  right, right_norm = [], []
  for (ll, _), example in zip(scores, task.examples):
    characters = np.array([len(c) for c in example.choices], np.float64)
    right.append(np.argmax(ll) == example.gold)
    right_norm.append(np.argmax(ll / characters) == example.gold)
  return {'acc': float(np.mean(right)), 'acc_norm': float(np.mean(right_norm))}
