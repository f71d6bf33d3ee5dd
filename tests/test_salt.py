"""SALT end to end on the tiny model: w schedules, the teacher, the two stages, scoring."""

import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import lock_held_elsewhere, tiny_config
from tests.runs import logged
from trainer import data, salt, sharding, step, train
from trainer.config import mesh_shape
from trainer.errors import UserError
from trainer.score import Windows, batch_scores, score


@pytest.mark.parametrize('schedule, expected', [
    # weight 0.5, n_kd 10, at steps 0, 5, 9, 10, 20
    ('constant', [0.5, 0.5, 0.5, 0.0, 0.0]),
    ('linear', [0.5, 0.25, 0.05, 0.0, 0.0]),
    # w / (1 - w) = 1 at step 0 falls to 0.5 at step 5: w = 1/3; to 0.1 at step 9: w = 1/11.
    ('linear_ratio', [0.5, 1 / 3, 1 / 11, 0.0, 0.0]),
])
def test_kd_weight_schedules(schedule, expected):
  got = [float(salt.kd_weight(jnp.float32(s), schedule=schedule, weight=0.5, n_kd=10)) for s in (0, 5, 9, 10, 20)]
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope='module')
def teacher_path(tiny_data, tmp_path_factory):
  """A small teacher trained for 20 steps on the tiny corpus."""
  workdir = tmp_path_factory.mktemp('teacher')
  config = tiny_config(tiny_data)
  config.total_steps = 20
  config.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64)
  config.checkpoint.every_steps = 20
  train.train(config, workdir)
  return str(workdir / 'checkpoints' / '20')


def salt_config(data_dir, teacher, **salt_options):
  config = tiny_config(data_dir)
  config.total_steps = 8
  config.log.every_steps = 1
  config.checkpoint.every_steps = 2
  config.salt.update(teacher=teacher, n_kd=4, **salt_options)
  return config


@pytest.mark.slow
def test_stage_one_distills_and_stage_two_trains_alone(tiny_data, teacher_path, tmp_path):
  train.train(salt_config(tiny_data, teacher_path, tau=2.0, teacher_top_k=5), tmp_path)
  records = logged(tmp_path)
  stage1, stage2 = records[:4], records[4:]
  for r in stage1:
    assert r['stage'] == 1 and r['w'] == 0.5
    assert {'kd', 'teacher_ce', 'top1_agreement'} <= r.keys()
    assert r['loss'] == pytest.approx(0.5 * r['ce'] + 0.5 * r['kd'], rel=1e-5)
  for r in stage2:
    # The stage-2 step computes no teacher terms: the teacher is not run.
    assert r['stage'] == 2 and not {'kd', 'w', 'teacher_ce'} & r.keys()
    assert r['loss'] == r['ce']
  assert [r['step'] for r in records] == list(range(1, 9))


def test_the_stage_two_program_has_no_teacher_and_the_teacher_is_freed(tiny_data, teacher_path):
  config = salt_config(tiny_data, teacher_path)
  mesh = sharding.make_mesh(mesh_shape(config.mesh, jax.device_count()))
  program = train.build(config, mesh, np.ones(320, np.int32))
  teacher = salt.load_teacher(teacher_path, mesh, sharding.parse_rules(config.sharding),
                              data.read_manifest(tiny_data)['tokenizer_sha256'])
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(teacher.params))
  state = program.abstract_state
  batch = {k: jax.ShapeDtypeStruct((8, 32), jnp.float32 if k == 'weights' else jnp.int32,
                                   sharding=program.batch_sharding)
           for k in step.BATCH_KEYS}
  stage1 = program.distillation_step(teacher).lower(state, batch, teacher.params).compile()
  stage2 = program.train_step.lower(state, batch).compile()
  teacher_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(teacher.params))
  # The compiled stage-2 step takes no teacher input and does less work than stage 1.
  assert stage2.memory_analysis().argument_size_in_bytes + teacher_bytes <= \
      stage1.memory_analysis().argument_size_in_bytes
  assert stage2.cost_analysis()['flops'] < stage1.cost_analysis()['flops']
  salt.free(teacher)
  assert all(x.is_deleted() for x in jax.tree.leaves(teacher.params))


@pytest.mark.slow
def test_a_resume_after_n_kd_never_reads_the_teacher(tiny_data, teacher_path, tmp_path):
  moved = tmp_path / 'teacher-copy'
  shutil.copytree(teacher_path, moved)
  config = salt_config(tiny_data, str(moved))
  config.total_steps = 6
  train.train(config, tmp_path / 'run')
  shutil.rmtree(moved)  # gone: a resume at step 6 > n_kd = 4 must not need it
  config.total_steps = 8
  last = train.train(config, tmp_path / 'run')
  assert last['stage'] == 2
  assert [r['step'] for r in logged(tmp_path / 'run')] == list(range(1, 9))


def test_a_missing_teacher_or_another_tokenizer_is_a_clear_error(tiny_data, teacher_path, tmp_path):
  with pytest.raises(UserError, match="salt.teacher='.*nowhere' is not a salt checkpoint"):
    train.train(salt_config(tiny_data, str(tmp_path / 'nowhere')), tmp_path / 'run')
  mesh = sharding.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1})
  with pytest.raises(UserError, match='was trained with tokenizer .* the student\'s data with 000000000000'):
    salt.load_teacher(teacher_path, mesh, sharding.parse_rules(tiny_config().sharding), '0' * 64)


def test_a_student_padded_to_another_vocabulary_than_its_teacher_is_one_line(tiny_data, teacher_path, tmp_path):
  """Issue 24: a vocabulary padded past the tokenizer is accepted, so one tokenizer can
  come with two sizes; distillation needs the teacher's."""
  config = salt_config(tiny_data, teacher_path)
  config.model.vocab_size += 16
  with pytest.raises(UserError, match='has 320 vocabulary rows and the student model.vocab_size=336; .*'
                                      'set --config.model.vocab_size=320'):
    train.train(config, tmp_path / 'run')


def numpy_scores(teacher_path, data_dir, top_k):
  """The scores from full logits, with NumPy: every window padded to the sequence length,
  one forward pass for all of them, then each record's median by hand."""
  meta = salt.teacher_metadata(teacher_path)['config']
  L = meta['data']['seq_len']
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  teacher = salt.load_teacher(teacher_path, mesh, sharding.parse_rules(meta['sharding']),
                              data.read_manifest(data_dir)['tokenizer_sha256'])
  stream = data.TokenStream(data_dir, 'train', L)
  every_window = Windows(stream.offsets, L, every=1)
  records, starts, _ = every_window.at(0, every_window.count)
  tokens = np.zeros((records.size, L + 1), np.int32)
  for i, (record, start) in enumerate(zip(records, starts)):
    piece = stream.record_tokens([record])[0][start:start + L + 1]
    tokens[i, :piece.size] = piece
  lengths = np.array([min(np.diff(stream.offsets)[r] - s, L + 1) - 1 for r, s in zip(records, starts)])

  @jax.jit
  def all_logits(params, tokens, positions):
    model = nnx.merge(teacher.graphdef, params)
    h = model(tokens, positions, jnp.ones_like(tokens))
    return h.astype(jnp.float32) @ model.unembedding().astype(jnp.float32)

  logits = np.asarray(all_logits(teacher.params, tokens[:, :-1], np.arange(L)[None] + starts[:, None]), np.float64)
  per_record = {}
  for i, record in enumerate(records):
    z, y = logits[i, :lengths[i]], tokens[i, 1:lengths[i] + 1]
    log_p = z - z.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    in_top_k = z[np.arange(y.size), y] >= np.sort(z, -1)[:, -top_k]
    per_record.setdefault(record, []).extend(-log_p[np.arange(y.size), y][in_top_k])
  return np.array([np.median(per_record[r]) if per_record.get(r) else np.nan for r in range(len(stream.records))])


def test_scores_equal_a_numpy_computation(tiny_data, teacher_path, tmp_path):
  summary = score(teacher_path, tiny_data, top_k=3, batch_size=8, output=tmp_path / 'scores.npy', progress=False)
  got = np.load(tmp_path / 'scores.npy')
  want = numpy_scores(teacher_path, tiny_data, top_k=3)
  assert summary['records'] == got.size == want.size
  assert summary['unscored'] == int(np.isnan(want).sum())
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  # The model runs in float32 here; the chunked loss sums in another order than NumPy.
  np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=2e-3, atol=2e-3)
  assert json.loads((tmp_path / 'scores.json').read_text())['top_k'] == 3

  # Every third record only: those get the same scores, the others none.
  sample = score(teacher_path, tiny_data, top_k=3, batch_size=8, every=3, output=tmp_path / 'sample.npy',
                 progress=False)
  sampled = np.load(tmp_path / 'sample.npy')
  assert np.isnan(sampled[np.arange(sampled.size) % 3 != 0]).all()
  np.testing.assert_array_equal(sampled[::3], got[::3])
  assert sample['sampled'] == len(sampled[::3]) and sample['unscored'] == int(np.isnan(want[::3]).sum())


@pytest.mark.slow
def test_stage_one_reads_the_selected_records(tiny_data, teacher_path, tmp_path, caplog):
  n = data.read_manifest(tiny_data)['splits']['train']['records']
  fake_scores = np.arange(n, dtype=np.float32)
  fake_scores[::7] = np.nan
  np.save(tmp_path / 'scores.npy', fake_scores)
  config = salt_config(tiny_data, teacher_path)
  config.data.selection.update(scores=str(tmp_path / 'scores.npy'), rule='top', keep_fraction=0.25)
  with caplog.at_level(logging.INFO, logger='salt'):
    train.train(config, tmp_path / 'run')
  written = json.loads((tmp_path / 'run' / 'config.json').read_text())
  kept = data.select_records(fake_scores, rule='top', keep_fraction=0.25)
  assert written['selection']['records'] == kept.size == round(0.25 * np.isfinite(fake_scores).sum())
  # Issue 18, 4: how many passes stage 1 makes over the selection, and a warning when it repeats it.
  rows = len(data.TokenStream(tiny_data, 'train', config.data.seq_len, records=kept))
  read = config.salt.n_kd * config.data.global_batch_size
  assert f'stage 1 reads {read} rows of {rows}: {read / rows:.2f} passes over its selected records' in caplog.text
  assert read < rows and 'is smaller than stage 1 reads' not in caplog.text
  stream = data.TokenStream(tiny_data, 'train', config.data.seq_len, records=kept)
  with caplog.at_level(logging.INFO, logger='salt'):
    assert train.log_stage1_passes(3 * rows, stream, selected=True) == 3.0
  assert (f'the selection ({rows} rows) is smaller than stage 1 reads ({3 * rows} rows): each selected record is '
          'read 3.00 times') in caplog.text


def both_stages(config, data_dir, teacher_path, rows: int) -> tuple:
  """A stage-1 step with the teacher, then a stage-2 step, on the first `rows` rows: the
  two steps' metrics and the parameters after, and the loops in stage 2's program."""
  stream = data.TokenStream(data_dir, 'train', config.data.seq_len)
  batch = {k: np.stack([data.to_model_inputs(stream.row(r))[k] for r in range(rows)]) for k in step.BATCH_KEYS}
  mesh = sharding.make_mesh(mesh_shape(config.mesh, jax.device_count()))
  program = train.build(config, mesh, np.ones(config.model.vocab_size, np.int32))
  teacher = salt.load_teacher(teacher_path, mesh, sharding.parse_rules(config.sharding),
                              data.read_manifest(data_dir)['tokenizer_sha256'])
  global_batch = sharding.host_batch_to_global(batch, program.batch_sharding)
  state, stage1 = program.distillation_step(teacher)(program.init(0), global_batch, teacher.params)
  loops = program.train_step.lower(state, global_batch).as_text().count('stablehlo.while')
  state, stage2 = program.train_step(state, global_batch)
  return jax.device_get((stage1, stage2, state.params)), loops


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['pallas', 'token_chunks'])
def test_train_steps_with_each_loss_kernel_equal_those_with_the_reference(tiny_data, teacher_path, impl):
  """Both stages on a (2, 2, 2) mesh, the vocabulary split over `tensor`: loss, metrics, parameters."""
  results = {}
  for name in ('xla', impl):
    config = salt_config(tiny_data, teacher_path, tau=2.0)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.loss.update(impl=name, block_tokens=16, block_vocab=128, chunk_tokens=16)
    results[name] = both_stages(config, tiny_data, teacher_path, rows=8)[0]
  for got, want in zip(jax.tree.leaves(results[impl]), jax.tree.leaves(results['xla'])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_score_refuses_a_top_k_that_would_score_nothing(tiny_data, teacher_path, tmp_path):
  """Issue 16: --top-k 0 wrote all-NaN scores (exit 0), and a selection from them failed later."""
  with pytest.raises(UserError, match='--top-k 0 must be >= 1'):
    score(teacher_path, tiny_data, top_k=0, output=tmp_path / 'scores.npy')
  assert not (tmp_path / 'scores.npy').exists()
  # An output in a missing directory failed only after all the scoring.
  with pytest.raises(UserError, match=f'--output {tmp_path}/nowhere/s.npy: the directory {tmp_path}/nowhere does not'):
    score(teacher_path, tiny_data, output=tmp_path / 'nowhere' / 's.npy')


def test_a_partial_score_file_is_continued_only_with_the_settings_that_made_it(tiny_data, teacher_path, tmp_path,
                                                                               monkeypatch):
  """Issue 16: a resumed `salt score` with another --top-k (or teacher) continued the old
  partial file, mixing two definitions of the score under the new one's name."""
  output = tmp_path / 'scores.npy'
  run_scores(teacher_path, tiny_data, output, monkeypatch, stop_at=10)
  partial = tmp_path / 'scores.npy.partial'
  assert partial.exists() and not output.exists()
  with pytest.raises(UserError, match=r'scores.npy.partial holds scores made with other settings \(top_k 3 -> 5\); '
                                      'run with those to continue it, or with --restart to score from the start'):
    score(teacher_path, tiny_data, top_k=5, batch_size=8, output=output, progress=False)
  restarted = score(teacher_path, tiny_data, top_k=5, batch_size=8, output=output, progress=False, restart=True)
  assert restarted['top_k'] == 5 and not partial.exists()
  fresh = score(teacher_path, tiny_data, top_k=5, batch_size=8, output=tmp_path / 'fresh.npy', progress=False)
  np.testing.assert_array_equal(np.load(output), np.load(tmp_path / 'fresh.npy'))
  assert fresh['scored'] == restarted['scored']


@pytest.mark.slow
def test_micro_batches_give_the_update_of_the_whole_batch_in_both_stages(tiny_data, teacher_path):
  """Issue 18, 5: two steps (stage 1 with the teacher, then stage 2) with 4 micro-batches
  equal two steps of the whole batch at once: fp32, loss and metrics to 1e-5 relative,
  parameters to 1e-5 relative (sums in another order)."""
  results, loops = {}, {}
  for micro_batches in (1, 4):
    config = salt_config(tiny_data, teacher_path, tau=2.0)
    config.data.update(global_batch_size=32, micro_batches=micro_batches)
    results[micro_batches], loops[micro_batches] = both_stages(config, tiny_data, teacher_path, rows=32)
  assert loops[4] == loops[1] + 1  # the parts are a loop: one part's activations live at a time
  assert results[1][0].keys() == results[4][0].keys() >= {'loss', 'ce', 'kd', 'grad_norm', 'top1_agreement'}
  for got, want in zip(jax.tree.leaves(results[4]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope='module')
def fresh_scores(tiny_data, teacher_path, tmp_path_factory):
  """The scores of the tiny corpus (top 3, batch 8) from one uninterrupted run."""
  output = tmp_path_factory.mktemp('fresh') / 'scores.npy'
  score(teacher_path, tiny_data, top_k=3, batch_size=8, output=output, progress=False)
  return np.load(output)


def run_scores(teacher_path, data_dir, output, monkeypatch, stop_at=None, seen=None) -> int:
  """`salt score` (top 3, batch 8) into `output`; with `stop_at`, killed as batch `stop_at`
  starts (the batches before it are done). `seen(batch)` is called as each batch starts.
  Returns how many batches it started."""
  from trainer import score as score_module

  read, started = score_module._host_batch, []

  def host_batch(*args):
    if seen:
      seen(len(started))
    if len(started) == stop_at:
      raise KeyboardInterrupt
    started.append(1)
    return read(*args)

  with monkeypatch.context() as patch:
    patch.setattr(score_module, '_host_batch', host_batch)
    try:
      score(teacher_path, data_dir, top_k=3, batch_size=8, output=output, progress=False)
    except KeyboardInterrupt:
      assert stop_at is not None
  return len(started)


def progress_files(directory) -> list:
  return sorted(p for p in directory.rglob('*') if p.is_file() and 'partial' in str(p.relative_to(directory)))


def test_a_killed_score_resumes_where_it_stopped_with_the_same_scores(tiny_data, teacher_path, fresh_scores,
                                                                       tmp_path, monkeypatch):
  """Issue 23: progress was saved every 50 batches only (a kill lost up to 49); a resumed
  run must give the uninterrupted run's scores bit for bit."""
  output = tmp_path / 'scores.npy'
  run_scores(teacher_path, tiny_data, output, monkeypatch, stop_at=60)
  assert not output.exists() and progress_files(tmp_path)
  again = run_scores(teacher_path, tiny_data, output, monkeypatch)
  total = -(-windows_count(tiny_data, seq_len=32) // 8)
  assert total > 60 and again <= total - 60 + 2  # a record spanning the kill is read again, no more
  np.testing.assert_array_equal(np.load(output), fresh_scores)
  assert not progress_files(tmp_path)


def windows_count(data_dir, seq_len: int) -> int:
  lengths = np.diff(data.TokenStream(data_dir, 'train', seq_len).offsets)
  return int(np.maximum(-(-(lengths - 1) // seq_len), 0).sum())


@pytest.mark.parametrize('damage', ['torn tail', 'damaged middle'])
def test_a_torn_or_damaged_progress_file_is_cut_to_its_last_whole_entry(tiny_data, teacher_path, fresh_scores,
                                                                       tmp_path, monkeypatch, caplog, damage):
  """Issue 23: a run killed while writing its progress left a file that the next run
  could not read (a traceback); it must continue from what is whole, to the same scores."""
  output = tmp_path / 'scores.npy'
  run_scores(teacher_path, tiny_data, output, monkeypatch, stop_at=60)
  for path in progress_files(tmp_path):
    if path.suffix != '.json':
      raw = bytearray(path.read_bytes())
      if damage == 'torn tail':
        path.write_bytes(raw[:-5])
      else:
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(raw)
  with caplog.at_level(logging.WARNING, logger='salt'):
    run_scores(teacher_path, tiny_data, output, monkeypatch)
  np.testing.assert_array_equal(np.load(output), fresh_scores)
  assert 'not whole' in caplog.text


def test_the_progress_file_is_appended_with_what_each_batch_completed(tiny_data, teacher_path, tmp_path,
                                                                       monkeypatch):
  """Issue 23: the progress file held every window's losses and was rewritten whole every
  50 batches (writes growing with the square of the corpus). It must grow by each batch's
  completed records, appended, and never hold more than a few bytes per window scored."""
  sizes = []

  def seen(batch):
    files = progress_files(tmp_path)
    sizes.append((batch, {p: (p.stat().st_ino, p.stat().st_size) for p in files}))

  run_scores(teacher_path, tiny_data, tmp_path / 'scores.npy', monkeypatch, seen=seen)
  for batch, files in sizes:
    assert sum(size for _, size in files.values()) <= 1024 + 16 * 8 * batch
  for (_, before), (_, after) in zip(sizes, sizes[1:]):
    for path, (inode, size) in before.items():
      assert after[path][0] == inode and after[path][1] >= size  # appended in place, never replaced
  assert sum(s for _, s in sizes[-1][1].values()) > sum(s for _, s in sizes[2][1].values()) > 0


def test_score_refuses_bad_arguments_before_scoring(tiny_data, teacher_path, tmp_path, monkeypatch, capsys):
  """Issue 23, C: each of these scored first (or silently used another value), then
  failed, overwrote the scores with the summary, or overwrote the data's manifest."""
  from trainer import cli
  from trainer import score as score_module

  def scoring(*args):
    raise AssertionError('scoring started')

  monkeypatch.setattr(score_module, '_scorer', scoring)
  (tmp_path / 'dir.npy').mkdir()
  cases = {
      ('--output', str(tmp_path / 's.json')): f'--output {tmp_path}/s.json must end in .npy',
      ('--output', str(tmp_path / 'dir.npy')): f'--output {tmp_path}/dir.npy is a directory',
      ('--output', str(tiny_data / 'manifest.npy')):
          f'--output {tiny_data}/manifest.npy: its summary {tiny_data}/manifest.json exists and is not a salt score',
      ('--batch', '-8'): '--batch -8 must be >= 1',
      ('--batch', '0'): '--batch 0 must be >= 1',
      ('--top-k', '321'): '--top-k 321 is more than the 320 tokens of the vocabulary',
  }
  for args, message in cases.items():
    code = cli.main(['score', '--teacher', teacher_path, '--data', str(tiny_data), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f'salt: error: {message}') and err.count('\n') == 1, (args, err)
  assert not (tmp_path / 's.json').exists()


def test_a_second_score_of_one_output_is_refused(tiny_data, teacher_path, tmp_path):
  """Issue 23, 9: two `salt score` on one output were not refused."""
  output = tmp_path / 'scores.npy'
  with lock_held_elsewhere(output) as pid:
    with pytest.raises(UserError, match=rf'^{output} is in use by process {pid} on .*; stop that job first, '
                                        'or give this one another --output$'):
      score(teacher_path, tiny_data, top_k=3, batch_size=8, output=output, progress=False)
  assert not (tmp_path / 'scores.npy.partial').exists()


def test_a_selection_of_a_file_that_holds_no_scores_is_one_line(tiny_data, tmp_path):
  """Issue 23, C: a .json (the summary), a damaged .npy, or an array of another kind
  failed in train with a traceback."""
  manifest = data.read_manifest(tiny_data)
  n = manifest['splits']['train']['records']
  (tmp_path / 'scores.json').write_text('{"top_k": 3}')
  (tmp_path / 'text.npy').write_text('not an array')
  np.save(tmp_path / 'cut.npy', np.zeros(n, np.float32))
  (tmp_path / 'cut.npy').write_bytes((tmp_path / 'cut.npy').read_bytes()[:-8])
  np.save(tmp_path / 'ints.npy', np.arange(n))
  np.save(tmp_path / 'square.npy', np.zeros((n, 2), np.float32))
  with open(tmp_path / 'zipped.npy', 'wb') as f:
    np.savez(f, scores=np.zeros(n, np.float32))
  cases = {
      'scores.json': 'is not a .npy file',
      'text.npy': 'cannot be read as a .npy array',
      'cut.npy': 'cannot be read as a .npy array',
      'ints.npy': 'holds int64 values',
      'square.npy': fr'holds \({n}, 2\) scores',
      'zipped.npy': 'cannot be read as a .npy array',
  }
  for name, message in cases.items():
    selection = tiny_config(tiny_data).data.selection
    selection.scores = str(tmp_path / name)
    with pytest.raises(UserError, match=message):
      train.select(selection, manifest, tiny_data)


@pytest.mark.slow
def test_two_processes_score_as_one(tiny_data, teacher_path, fresh_scores, tmp_path):
  """Issue 23: each of 2 processes appends the records it completes, process 0 joins the
  parts. The last batch holds one window, so process 1's rows of it are all past the end:
  it failed there, reading no records."""
  from trainer import cli

  output = tmp_path / 'scores.npy'
  assert windows_count(tiny_data, seq_len=32) % 8 <= 4
  assert cli.main(['launch', 'local', '--processes', '2', '--devices-per-process', '4', '--', 'salt', 'score',
                   '--teacher', teacher_path, '--data', str(tiny_data), '--top-k', '3', '--batch', '8',
                   '--output', str(output)]) == 0
  got = np.load(output)
  # The same program on the same 8 devices; only the processes' collectives (gloo) may sum in another order.
  np.testing.assert_array_equal(np.isnan(got), np.isnan(fresh_scores))
  np.testing.assert_allclose(got, fresh_scores, rtol=1e-5)
  assert json.loads(output.with_suffix('.json').read_text())['scored'] == int(np.isfinite(fresh_scores).sum())
  assert not (tmp_path / 'scores.npy.partial').exists()


@pytest.mark.parametrize('batch', [1, 2, 5, 64])
def test_batch_scores_equal_the_median_of_each_whole_record(batch):
  """Records spanning batches (a batch of 1 window splits every one) carry their losses
  until their last window: each score is the median of all its learnable losses."""
  rng = np.random.default_rng(0)
  counts = rng.integers(0, 4, size=30)  # windows per record; 0: too short to predict anything
  windows = Windows(np.concatenate([[0], np.cumsum(np.where(counts, counts * 8 - 4, 1))]), seq_len=8, every=1)
  assert windows.count == counts.sum()
  loss = rng.random((windows.count, 8), dtype=np.float32)
  learnable = rng.random((windows.count, 8)) < 0.3
  got, carry = {}, None
  for first in range(0, windows.count, batch):
    j, _, last = windows.at(first, first + batch)
    done, scores, carry = batch_scores(j, last, loss[first:first + j.size], learnable[first:first + j.size], carry)
    got.update(zip(done.tolist(), scores))
  assert carry is None and sorted(got) == np.flatnonzero(counts).tolist()
  j_all = windows.at(0, windows.count)[0]
  for record, value in got.items():
    values = loss[j_all == record][learnable[j_all == record]]
    want = np.median(values) if values.size else np.nan
    np.testing.assert_array_equal(value, np.float32(want))
