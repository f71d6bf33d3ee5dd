"""The `salt` command: train, demo, prepare, score, import-teacher, export, sample, eval, dryrun, launch."""

import argparse
import json
import logging
import sys
from pathlib import Path

from trainer.errors import PREEMPTED_EXIT_CODE, Preempted, UserError

log = logging.getLogger('salt')


def _train(args, overrides):
  from trainer import config as config_lib
  from trainer import distributed
  from trainer.train import train

  distributed.initialize()
  train(config_lib.load(args.config, overrides), args.workdir, resume=args.resume,
        allow_data_change=args.allow_data_change)


def _demo(args, overrides):
  from trainer import demo

  if overrides:
    raise UserError(f'unrecognized arguments: {" ".join(overrides)}')
  if args.seeds < 1:
    raise UserError(f'--seeds {args.seeds} must be at least 1')
  demo.run(Path(args.workdir), seeds=args.seeds)


def _prepare(args, overrides):
  from trainer.prepare import prepare

  if overrides:
    raise UserError(f'unrecognized arguments: {" ".join(overrides)}')
  manifest = prepare(args.inputs, Path(args.output), validation=args.validation or (),
                     vocab_size=args.vocab_size, tokenizer=args.tokenizer, txt_split=args.txt_split,
                     text_field=args.text_field, text_column=args.column,
                     max_record_tokens=args.max_record_tokens, workers=args.workers, progress=True,
                     overwrite=args.overwrite)
  for name, split in manifest['splits'].items():
    log.info('%s: %d documents, %d records, %d tokens in %d shards', name, split['documents'],
             split['records'], split['tokens'], len(split['shards']))
  for reason, count in manifest['skipped'].items():
    log.warning('skipped %d documents: %s', count, reason)
  for problem in manifest['problems'][:20]:
    log.warning('  %s', problem)


def _score(args, overrides):
  from trainer import distributed
  from trainer.score import describe, score

  if overrides:
    raise UserError(f'unrecognized arguments: {" ".join(overrides)}')
  distributed.initialize()
  summary = score(args.teacher, Path(args.data), top_k=args.top_k, batch_size=args.batch, every=args.every,
                  output=Path(args.output) if args.output else None, restart=args.restart)
  log.info(describe(summary))


def _import_teacher(args, overrides):
  from trainer.hf_import import import_teacher

  if overrides:
    raise UserError(f'unrecognized arguments: {" ".join(overrides)}')
  summary = import_teacher(Path(args.model), Path(args.output), tokenizer=args.tokenizer)
  log.info('imported %s into %s\n  prepare the student\'s data: salt prepare ... --tokenizer %s\n'
           '  then train with: --config.salt.teacher=%s --config.model.vocab_size=%d',
           args.model, summary['checkpoint'], summary['tokenizer'], summary['checkpoint'],
           summary['config']['model']['vocab_size'])


def _export(args, overrides):
  from trainer.hf_export import export

  if overrides:
    raise UserError(f'unrecognized arguments: {" ".join(overrides)}')
  summary = export(Path(args.checkpoint), Path(args.output), tokenizer=args.tokenizer, dtype=args.dtype,
                   max_shard_gb=args.max_shard_gb)
  log.info('exported %.1fM parameters (%s) to %s: %s\n  evaluate: lm_eval --model hf --model_args pretrained=%s '
           '--tasks TASKS', summary['parameters'] / 1e6, summary['dtype'], summary['output'],
           ', '.join(summary['files']), summary['output'])


def _sample(args, overrides):
  from trainer import decode

  if overrides:
    raise UserError(f'unrecognized arguments: {" ".join(overrides)}')
  prompts = decode.read_prompts(args.prompt, Path(args.prompts) if args.prompts else None)
  sampling = decode.Sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed)
  # One prompt on a terminal shows its text as it comes; otherwise the whole text at the end.
  streaming = len(prompts) == 1 and sys.stdout.isatty()
  texts = decode.sample(Path(args.checkpoint), prompts, sampling, tokenizer=args.tokenizer,
                        stream=_write_now if streaming else None)
  if streaming:
    print()
  elif len(prompts) == 1:
    print(texts[0])
  else:
    for prompt, text in zip(prompts, texts):
      print(json.dumps({'prompt': prompt, 'continuation': text}, ensure_ascii=False))


def _write_now(text: str) -> None:
  sys.stdout.write(text)
  sys.stdout.flush()


def _eval(args, overrides):
  import jax

  from trainer import distributed
  from trainer.train import evaluate_checkpoint

  if overrides:
    raise UserError(f'unrecognized arguments: {" ".join(overrides)}')
  distributed.initialize()
  lines = evaluate_checkpoint(Path(args.checkpoint), args.tasks, shots=args.shots, tokenizer=args.tokenizer)
  if jax.process_index() == 0:
    for line in lines:
      print(json.dumps(line, ensure_ascii=False))


def _dryrun(args, overrides):
  from trainer import config as config_lib
  from trainer import distributed, dryrun

  distributed.initialize()
  dryrun.run(config_lib.load(args.config, overrides), steps=args.steps, topology=args.topology,
             workdir=Path(args.workdir) if args.workdir else None, teacher_spec=args.teacher_config)


def parser() -> argparse.ArgumentParser:
  from launch import local as launch_local
  from launch import tpu as launch_tpu
  from launch import xpk as launch_xpk

  p = argparse.ArgumentParser(prog='salt', description=__doc__)
  sub = p.add_subparsers(dest='command', required=True)

  train = sub.add_parser(
      'train', help='train a model',
      usage='salt train --config FILE[:ARG] [--config.KEY=VALUE ...] --workdir DIR [--resume auto|never|PATH] '
            '[--allow-data-change]',
      epilog=f'exit codes: 0 done; 2 bad input or a loss that is not finite; {PREEMPTED_EXIT_CODE} '
             'preempted (a checkpoint was saved: run the same command again to resume)')
  train.add_argument('--config', required=True, help='a config file, optionally :ARG for get_config')
  train.add_argument('--workdir', required=True, help='where the run writes everything')
  train.add_argument('--resume', default='auto', metavar='auto|never|PATH', help=(
      'auto: continue from the latest readable checkpoint in WORKDIR (the default); never: start '
      'fresh; PATH: continue from that checkpoint (RUN/checkpoints/STEP) and no other'))
  train.add_argument('--allow-data-change', action='store_true', help=(
      'resume although the data or a setting that decides the batches (seq_len, batch size, shuffle seed, '
      'selection, n_kd) differs from the checkpoint\'s; recorded in config.json'))
  train.set_defaults(run=_train)

  dm = sub.add_parser('demo', help='the whole SALT method on the embedded corpus, with a report (make demo)')
  dm.add_argument('--workdir', default='runs/demo', help='where the runs, scores and report go')
  dm.add_argument('--seeds', type=int, default=1, help='students per arm, each seed its own initialisation and '
                  'data order; the report gives the mean and the paired difference with its 95%% interval')
  dm.set_defaults(run=_demo)

  prep = sub.add_parser('prepare', help='tokenize raw text into ArrayRecord shards')
  prep.add_argument('inputs', nargs='+', help='.txt, .jsonl or .parquet files or globs (training split)')
  prep.add_argument('--output', required=True)
  prep.add_argument('--validation', nargs='*', help='files or globs of the validation split')
  prep.add_argument('--vocab-size', type=int, default=32000)
  prep.add_argument('--tokenizer', metavar='DIR_OR_FILE', help='an existing tokenizer to use instead of training '
                    'one: a sentencepiece model, a Hugging Face tokenizer.json, or a model directory holding one '
                    '(its tokenizer.json first)')
  prep.add_argument('--txt-split', choices=('file', 'blank-line'), default='file',
                    help='a .txt file is one document, or one per blank-line-separated block')
  prep.add_argument('--text-field', default='text', help='the field of a .jsonl record holding its text')
  prep.add_argument('--column', default='text', help='the column of a .parquet file holding the text')
  prep.add_argument('--max-record-tokens', type=int, default=2048,
                    help='longer documents are stored as consecutive records of this many tokens')
  prep.add_argument('--workers', type=int, help='processes tokenizing in parallel (default: all cores)')
  prep.add_argument('--overwrite', action='store_true',
                    help='prepare again into an --output made from other inputs or settings')
  prep.set_defaults(run=_prepare)

  sc = sub.add_parser('score', help="score every training record with the small model (SALT's data selection)")
  sc.add_argument('--teacher', required=True, help='the small model: a salt checkpoint, RUN/checkpoints/STEP')
  sc.add_argument('--data', required=True, help='a directory written by salt prepare')
  sc.add_argument('--top-k', type=int, default=10, help='a token counts as learnable if it is in the top k')
  sc.add_argument('--batch', type=int, help="windows per batch (default: the teacher run's global batch)")
  sc.add_argument('--every', type=int, default=1,
                  help='score every n-th record only; the others are never selected (default: all)')
  sc.add_argument('--output', help='where to write the scores, a .npy file (default: DATA/scores.npy); the summary '
                  'goes beside it ending in .json, the progress in OUTPUT.partial/ (with several processes: on '
                  'storage they share)')
  sc.add_argument('--restart', action='store_true',
                  help='score from the start, discarding the progress made with other settings')
  sc.set_defaults(run=_score)

  dr = sub.add_parser(
      'dryrun', help='compile the train step for these devices, check it fits, run a few steps and a checkpoint',
      usage='salt dryrun --config FILE[:ARG] [--config.KEY=VALUE ...] [--steps N] [--topology TYPE] '
            '[--workdir DIR] [--teacher-config FILE[:ARG]]')
  dr.add_argument('--config', required=True, help='a config file, optionally :ARG for get_config')
  dr.add_argument('--steps', type=int, default=3, help='timed steps per stage, after one warm-up step')
  dr.add_argument('--topology', help='compile for a Cloud TPU type such as v5p-128 instead (needs libtpu), '
                  'run nothing; --config.mesh.dcn_data=N makes it N slices')
  dr.add_argument('--workdir', help='where the test checkpoint goes (default: a temporary directory)')
  dr.add_argument('--teacher-config', help="the teacher's config when salt.teacher is not trained yet: "
                  'stage 1 then runs with a random teacher of that size')
  dr.set_defaults(run=_dryrun)

  la = sub.add_parser('launch', help='run salt on a Cloud TPU pod (gcloud or GKE), or as several processes here')
  where = la.add_subparsers(dest='where', required=True)
  launch_tpu.add_parser(where)
  launch_xpk.add_parser(where)
  launch_local.add_parser(where)

  imp = sub.add_parser('import-teacher', help='a Hugging Face Llama, Mistral, Qwen2 or Gemma 3 model (safetensors) '
                       'as a salt teacher checkpoint')
  imp.add_argument('model', metavar='DIR', help='the model directory: config.json, *.safetensors, tokenizer.json '
                   'or tokenizer.model')
  imp.add_argument('output', metavar='OUT', help="a new directory: checkpoints/0, config.json, the tokenizer's files")
  imp.add_argument('--tokenizer', metavar='PATH', help='the tokenizer (tokenizer.json, tokenizer.model or a directory '
                   'holding one), for a model directory without one')
  imp.set_defaults(run=_import_teacher)

  ex = sub.add_parser('export', help="a salt checkpoint as a Hugging Face model of its family "
                      "(transformers, lm-evaluation-harness, vLLM)")
  ex.add_argument('checkpoint', metavar='CHECKPOINT', help='RUN/checkpoints/STEP')
  ex.add_argument('output', metavar='OUT', help='a new directory: config.json, safetensors, tokenizer')
  ex.add_argument('--tokenizer', metavar='PATH', help="the run's tokenizer, where it is not found "
                  "beside the checkpoints or in the run's data directory")
  ex.add_argument('--dtype', default='float32', help='float32 (as trained, the default) or bfloat16 (half the size)')
  ex.add_argument('--max-shard-gb', type=float, default=5.0, help='largest safetensors file; beyond it, shards')
  ex.set_defaults(run=_export)

  ev = sub.add_parser('eval', help='few-shot accuracy of a checkpoint on evaluation tasks, as in the run',
                      usage='salt eval CHECKPOINT [--tasks FILE.jsonl,...] [--shots K] [--tokenizer PATH]')
  ev.add_argument('checkpoint', metavar='CHECKPOINT', help='RUN/checkpoints/STEP')
  ev.add_argument('--tasks', help="task files (.jsonl), comma-separated, or the embedded corpus's tasks "
                  "(next_line, next_speaker); default: the run's eval.tasks. Prints a JSON line per task")
  ev.add_argument('--shots', type=int, help="demonstrations before each example (default: the run's eval.task_shots)")
  ev.add_argument('--tokenizer', metavar='PATH', help="the run's tokenizer, where it is not found "
                  "beside the checkpoints or in the run's data directory")
  ev.set_defaults(run=_eval)

  sa = sub.add_parser('sample', help='generate text from a checkpoint',
                      usage='salt sample CHECKPOINT [--prompt TEXT] [--prompts FILE] [--max-tokens N] '
                            '[--temperature T] [--top-k K] [--top-p P] [--seed S] [--tokenizer PATH]')
  sa.add_argument('checkpoint', metavar='CHECKPOINT', help="RUN/checkpoints/STEP, or an imported teacher's "
                  'OUT/checkpoints/0')
  sa.add_argument('--prompt', metavar='TEXT', help='the text to continue')
  sa.add_argument('--prompts', metavar='FILE', help='a file of prompts, one per line, generated as one batch; '
                  'prints a JSON line per prompt: {"prompt", "continuation"}')
  sa.add_argument('--max-tokens', type=int, default=128, help='new tokens at most; a prompt stops earlier at EOS')
  sa.add_argument('--temperature', type=float, default=1.0, help='divides the logits; 0: greedy')
  sa.add_argument('--top-k', type=int, default=0, help='draw from the k most likely tokens only (0: all)')
  sa.add_argument('--top-p', type=float, default=1.0,
                  help='then from the most likely tokens whose probability reaches p only (1: all)')
  sa.add_argument('--seed', type=int, default=0, help='the same seed gives the same text')
  sa.add_argument('--tokenizer', metavar='PATH', help="the run's tokenizer, where it is not found "
                  "beside the checkpoints or in the run's data directory")
  sa.set_defaults(run=_sample)
  return p


def main(argv: list[str] | None = None) -> int:
  # salt's own messages at INFO; libraries only when they warn.
  logging.basicConfig(level=logging.WARNING, format='%(message)s')
  log.setLevel(logging.INFO)
  args, rest = parser().parse_known_args(argv)
  try:
    code = args.run(args, rest)  # the launchers return their workers' exit code
  except UserError as e:
    print(f'salt: error: {e}', file=sys.stderr)
    return 2
  except OSError as e:  # a workdir that cannot be written, a full disk: the machine's state, not a bug
    print(f'salt: error: {e.strerror or e}{": " + str(e.filename) if e.filename else ""}', file=sys.stderr)
    return 2
  except Preempted as e:
    print(f'salt: {e}', file=sys.stderr)
    return PREEMPTED_EXIT_CODE
  return code or 0


if __name__ == '__main__':
  sys.exit(main())
