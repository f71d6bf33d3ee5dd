"""One tokenizer interface for sentencepiece models and Hugging Face tokenizer.json files:
loading by file or directory, ids as the library gives them, bytes per token, an identity
that follows tokenization alone, one-line errors, and `salt prepare --tokenizer` with a
Hugging Face tokenizer end to end."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from tests.helpers import WORDS, tiny_config, write_corpus
from trainer import cli, data, tokenizer
from trainer.errors import UserError
from trainer.prepare import prepare
from trainer.train import check_tokenizer

# Llama 3's split before its byte-level pre-tokenizer.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
UNICODE = 'café naïve — 日本語 😀 Ünïcödé\n\tindented  twice\n'
TEXTS = ['the king speaks.', 'the fool runs\n  under the sea', UNICODE, 'crown 1234 swords', '']


def training_text() -> list[str]:
  rng = random.Random(0)
  return [' '.join(rng.choices(WORDS, k=rng.randint(4, 12))) + '.' for _ in range(400)] + [UNICODE] * 20


def save(tok: tokenizers.Tokenizer, directory: Path, config: dict | None) -> Path:
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / 'tokenizer.json'))
  if config is not None:
    (directory / 'tokenizer_config.json').write_text(json.dumps(config))
  return directory


def byte_level_bpe(directory: Path) -> Path:
  """Llama 3's layout: a split, then byte-level BPE; BOS added by the post-processor."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(training_text(), trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<|begin_of_text|>', '<|end_of_text|>'], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = processors.TemplateProcessing(single='<|begin_of_text|> $A',
                                                     special_tokens=[('<|begin_of_text|>', 0)])
  return save(tok, directory, {'bos_token': '<|begin_of_text|>',
                               'eos_token': {'content': '<|end_of_text|>', '__type': 'AddedToken'}})


def unigram(directory: Path) -> Path:
  """Metaspace and byte fallback, like sentencepiece's models converted to tokenizer.json."""
  trained = tokenizers.Tokenizer(models.Unigram())
  trained.pre_tokenizer = pre_tokenizers.Metaspace()
  trained.train_from_iterator(training_text(), trainers.UnigramTrainer(
      vocab_size=300, special_tokens=['<unk>', '<s>', '</s>'], unk_token='<unk>', show_progress=False))
  vocab = [(piece, score) for piece, score in json.loads(trained.to_str())['model']['vocab']]
  vocab += [(f'<0x{b:02X}>', -100.0) for b in range(256)]
  tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
  tok.add_special_tokens(['<unk>', '<s>', '</s>'])
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Metaspace()])
  return save(tok, directory, {'bos_token': '<s>', 'eos_token': '</s>'})


def wordpiece(directory: Path) -> Path:
  tok = tokenizers.Tokenizer(models.WordPiece(unk_token='[UNK]'))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  tok.train_from_iterator(training_text(), trainers.WordPieceTrainer(
      vocab_size=300, special_tokens=['[UNK]', '[CLS]', '[SEP]', '[PAD]'], show_progress=False))
  return save(tok, directory, {'bos_token': '[CLS]', 'eos_token': '[SEP]', 'pad_token': '[PAD]'})


BUILDERS = {'byte_level_bpe': byte_level_bpe, 'unigram': unigram, 'wordpiece': wordpiece}
SPECIALS = {'byte_level_bpe': ('<|end_of_text|>', '<|begin_of_text|>', None), 'unigram': ('</s>', '<s>', None),
            'wordpiece': ('[SEP]', '[CLS]', '[PAD]')}


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
  root = tmp_path_factory.mktemp('hf')
  return {name: build(root / name) for name, build in BUILDERS.items()}


def reference(directory: Path) -> tokenizers.Tokenizer:
  return tokenizers.Tokenizer.from_file(str(directory / 'tokenizer.json'))


def spec(directory: Path) -> dict:
  return json.loads((directory / 'tokenizer.json').read_text())


def copy(directory: Path, target: Path, tokenizer_json: dict | str | None = None, config: dict | None = None) -> Path:
  """`directory`'s tokenizer in `target`, its tokenizer.json or config replaced where given."""
  target.mkdir(parents=True)
  text = (directory / 'tokenizer.json').read_text() if tokenizer_json is None else (
      tokenizer_json if isinstance(tokenizer_json, str) else json.dumps(tokenizer_json))
  (target / 'tokenizer.json').write_text(text)
  config = json.loads((directory / 'tokenizer_config.json').read_text()) if config is None else config
  (target / 'tokenizer_config.json').write_text(json.dumps(config))
  return target


def one_line_error(path, match: str) -> UserError:
  with pytest.raises(UserError, match=match) as error:
    tokenizer.load(path)
  assert '\n' not in str(error.value)
  return error.value


# --- loading ---------------------------------------------------------------------------


@pytest.mark.parametrize('name', BUILDERS)
def test_a_hugging_face_tokenizer_loads_by_file_or_directory_with_its_special_tokens(hf_dirs, name):
  ref = reference(hf_dirs[name])
  by_dir, by_file = tokenizer.load(hf_dirs[name]), tokenizer.load(hf_dirs[name] / 'tokenizer.json')
  assert by_dir.kind == by_file.kind == 'huggingface' and by_dir.sha256 == by_file.sha256
  assert by_dir.files == ('tokenizer.json', 'tokenizer_config.json')
  assert by_dir.vocab_size == ref.get_vocab_size(with_added_tokens=True)
  eos, bos, pad = SPECIALS[name]
  assert (by_dir.eos_id, by_dir.bos_id, by_dir.pad_id) == (ref.token_to_id(eos), ref.token_to_id(bos),
                                                           pad and ref.token_to_id(pad))
  assert by_dir.id_to_token(by_dir.eos_id) == eos


def test_a_sentencepiece_model_loads_by_file_or_directory_and_a_directory_prefers_tokenizer_json(
    sp_model, hf_dirs, tmp_path):
  sp = spm.SentencePieceProcessor(model_file=str(sp_model))
  for tok in (tokenizer.load(sp_model), tokenizer.load(sp_model.parent)):
    assert (tok.kind, tok.files, tok.vocab_size, tok.eos_id) == ('sentencepiece', ('tokenizer.model',), 320,
                                                                 sp.eos_id())
  both = copy(hf_dirs['unigram'], tmp_path / 'both')
  (both / 'tokenizer.model').write_bytes(sp_model.read_bytes())
  assert tokenizer.load(both).kind == 'huggingface'
  assert tokenizer.load(both / 'tokenizer.model').kind == 'sentencepiece'


@pytest.mark.parametrize('name', BUILDERS)
def test_ids_are_the_library_s_without_special_tokens(hf_dirs, name):
  tok = tokenizer.load(hf_dirs[name])
  expected = [e.ids for e in reference(hf_dirs[name]).encode_batch(TEXTS, add_special_tokens=False)]
  got = tok.encode(TEXTS)
  assert [ids.dtype for ids in got] == [np.int32] * len(TEXTS)
  assert [ids.tolist() for ids in got] == expected
  assert tok.bos_id not in np.concatenate(got)


def test_a_tokenizer_json_with_truncation_and_padding_on_encodes_a_document_whole(hf_dirs, tmp_path):
  ref = reference(hf_dirs['byte_level_bpe'])
  whole = ref.encode(UNICODE * 5, add_special_tokens=False).ids
  ref.enable_truncation(max_length=8)
  ref.enable_padding(length=16)
  (tmp_path / 'tokenizer.json').write_text(ref.to_str())
  (tmp_path / 'tokenizer_config.json').write_text('{"eos_token": "<|end_of_text|>"}')
  [ids] = tokenizer.load(tmp_path).encode([UNICODE * 5])
  assert ids.tolist() == whole and len(whole) > 16


def test_sentencepiece_ids_and_newline_cut_are_its_own(sp_model):
  sp = spm.SentencePieceProcessor(model_file=str(sp_model))
  tok = tokenizer.load(sp_model)
  assert [ids.tolist() for ids in tok.encode(TEXTS)] == sp.encode(TEXTS)
  assert tok.newline_ids() == sp.encode('\n')
  assert tok.decode(tok.encode(['the king speaks'])[0]) == 'the king speaks'


def test_hugging_face_tokenizers_are_encoded_whole(hf_dirs):
  assert all(tokenizer.load(d).newline_ids() is None for d in hf_dirs.values())


# --- bytes per token -------------------------------------------------------------------


def test_byte_level_token_bytes_sum_to_the_utf8_bytes_of_the_text(hf_dirs):
  tok = tokenizer.load(hf_dirs['byte_level_bpe'])
  sizes = tok.token_bytes()
  assert sizes.shape == (tok.vocab_size,) and sizes.dtype == np.int32
  for text, ids in zip(TEXTS, tok.encode(TEXTS)):
    assert sizes[ids].sum() == len(text.encode('utf-8')), text
  assert sizes[tok.eos_id] == sizes[tok.bos_id] == 0


def test_unigram_counts_metaspace_as_a_space_and_a_byte_token_as_one_byte(hf_dirs):
  tok = tokenizer.load(hf_dirs['unigram'])
  sizes = tok.token_bytes()
  text = 'the queen falls Ω'  # Ω is in no piece: two byte tokens
  ids = tok.encode([text])[0]
  assert [tok.id_to_token(i) for i in ids[-2:]] == ['<0xCE>', '<0xA9>']
  assert sizes[ids].sum() == len((' ' + text).encode('utf-8'))  # with Metaspace's leading space
  assert sizes[tok.eos_id] == sizes[tok.bos_id] == sizes[0] == 0  # <unk> too


def test_wordpiece_continuations_count_without_their_prefix(hf_dirs):
  tok = tokenizer.load(hf_dirs['wordpiece'])
  sizes = tok.token_bytes()
  text = 'the kingdom speaks. under crowns'
  ids = tok.encode([text])[0]
  assert any(tok.id_to_token(i).startswith('##') for i in ids)
  assert sizes[ids].sum() == len(text.replace(' ', ''))  # WordPiece drops the spaces between words
  assert sizes[tok.pad_id] == 0


def test_sentencepiece_token_bytes_are_data_s(tiny_data, sp_model):
  tok = tokenizer.load(sp_model)
  ids = tok.encode(['the king speaks'])[0]
  assert tok.token_bytes()[ids].sum() == len(' the king speaks')  # with sentencepiece's leading space
  assert (data.token_bytes(tiny_data / 'tokenizer.model') == tok.token_bytes()).all()


# --- identity --------------------------------------------------------------------------


def reordered(value):
  """The same JSON with every object's keys in reverse order."""
  if isinstance(value, dict):
    return {k: reordered(v) for k, v in reversed(value.items())}
  return [reordered(v) for v in value] if isinstance(value, list) else value


def test_the_identity_follows_tokenization_not_the_file(hf_dirs, tmp_path):
  source = hf_dirs['byte_level_bpe']
  original, identity = spec(source), tokenizer.load(source).sha256
  old_merges = [' '.join(m) for m in original['model']['merges']]
  same = {
      'indent': json.dumps(original, indent=4),
      'key order': reordered(original),
      'decoder': {**original, 'decoder': None},
      'post-processor, truncation, padding': {**original, 'post_processor': None, 'padding': None,
                                              'truncation': {'direction': 'Right', 'max_length': 9, 'strategy':
                                                             'LongestFirst', 'stride': 0}},
      'merges as "a b"': {**original, 'model': {**original['model'], 'merges': old_merges}},
  }
  for what, changed in same.items():
    assert tokenizer.load(copy(source, tmp_path / what, changed)).sha256 == identity, what
  merges = original['model']['merges']
  vocab = dict(original['model']['vocab'])
  vocab['Ġzzz'] = max(vocab.values()) + 1
  differ = {
      'one merge': ({**original, 'model': {**original['model'], 'merges': merges[:-1]}}, None),
      'one vocabulary entry': ({**original, 'model': {**original['model'], 'vocab': vocab}}, None),
      'another EOS': (None, {'eos_token': '<|begin_of_text|>'}),
  }
  for what, (changed, config) in differ.items():
    assert tokenizer.load(copy(source, tmp_path / what, changed, config)).sha256 != identity, what


def test_a_unigram_score_changes_the_identity(hf_dirs, tmp_path):
  original = spec(hf_dirs['unigram'])
  vocab = [list(v) for v in original['model']['vocab']]
  vocab[10][1] += 1.0
  changed = copy(hf_dirs['unigram'], tmp_path / 'u', {**original, 'model': {**original['model'], 'vocab': vocab}})
  assert tokenizer.load(changed).sha256 != tokenizer.load(hf_dirs['unigram']).sha256


# --- bad input -------------------------------------------------------------------------


def test_every_bad_tokenizer_is_one_line(hf_dirs, tmp_path):
  one_line_error(tmp_path / 'nowhere', r"tokenizer '.*nowhere' does not exist; give a sentencepiece model "
                                       r'\(tokenizer.model\), a Hugging Face tokenizer.json, or the model directory')
  (tmp_path / 'model').mkdir()
  (tmp_path / 'model' / 'config.json').write_text('{"eos_token_id": 2}')
  one_line_error(tmp_path / 'model', 'model holds neither tokenizer.json nor tokenizer.model; give a sentencepiece')
  for name, content in (('garbage.model', b'a tiktoken vocabulary\n'), ('empty.model', b''),
                        ('binary.model', bytes(range(256))), ('tokenizer.json', b'{"not": "a tokenizer"}'),
                        ('broken.json', b'{"model": ')):
    (tmp_path / name).write_bytes(content)
    one_line_error(tmp_path / name, f'{name} is neither a sentencepiece model nor a Hugging Face tokenizer.json')

  unknown = copy(hf_dirs['byte_level_bpe'], tmp_path / 'unknown', config={'eos_token': '</s>'})
  one_line_error(unknown, r"tokenizer_config.json names eos_token '</s>', which is not in the vocabulary of")
  no_eos = copy(hf_dirs['byte_level_bpe'], tmp_path / 'no_eos', config={'bos_token': '<|begin_of_text|>'})
  one_line_error(no_eos, r'no EOS token is named for .*tokenizer.json; add "eos_token": .* to '
                         r'.*no_eos/tokenizer_config.json')
  (no_eos / 'tokenizer_config.json').unlink()
  one_line_error(no_eos, r'no EOS token is named for .*; add "eos_token": .* to .*no_eos/tokenizer_config.json')
  (no_eos / 'config.json').write_text('{"eos_token_id": 4000}')
  one_line_error(no_eos, r'config.json names eos_token_id 4000, but .* has ids 0..')


def test_without_a_tokenizer_config_the_model_config_names_eos_and_the_copy_keeps_it(hf_dirs, tmp_path):
  source = copy(hf_dirs['byte_level_bpe'], tmp_path / 'model')
  (source / 'tokenizer_config.json').unlink()
  (source / 'config.json').write_text('{"eos_token_id": 0, "bos_token_id": 0}')
  (source / 'generation_config.json').write_text('{"eos_token_id": [1, 0], "bos_token_id": 0}')
  tok = tokenizer.load(source)
  assert (tok.eos_id, tok.bos_id, tok.pad_id) == (1, 0, None)  # generation_config.json first, a list's first
  tok.copy_to(tmp_path / 'copy')
  assert sorted(p.name for p in (tmp_path / 'copy').iterdir()) == ['tokenizer.json', 'tokenizer_config.json']
  copied = tokenizer.load(tmp_path / 'copy')
  assert (copied.sha256, copied.eos_id, copied.bos_id) == (tok.sha256, 1, 0)


# --- salt prepare and train ------------------------------------------------------------


def documents(directory: Path) -> list[list[int]]:
  """The ids of each document of a prepared directory's training split, its records joined."""
  stream = data.TokenStream(directory, 'train', seq_len=16)
  records = stream.record_tokens(list(range(len(stream.records))))
  joined: dict[int, list[int]] = {}
  for k, ids in enumerate(records):
    joined.setdefault(int(stream.document[k]), []).extend(ids.tolist())
  return list(joined.values())


def test_prepare_with_a_hugging_face_tokenizer_end_to_end(hf_dirs, sp_model, tmp_path):
  source = hf_dirs['byte_level_bpe']
  (tmp_path / 'in').mkdir()
  inputs = write_corpus(tmp_path / 'in', 3, seed=12)
  (tmp_path / 'in' / 'unicode.txt').write_text(UNICODE.strip('\n'))
  inputs.append(str(tmp_path / 'in' / 'unicode.txt'))
  out = tmp_path / 'out'
  assert cli.main(['prepare', *inputs, '--output', str(out), '--tokenizer', str(source), '--workers', '2',
                   '--max-record-tokens', '16']) == 0
  manifest = json.loads((out / 'manifest.json').read_text())
  tok = tokenizer.load(source)
  assert manifest['tokenizer'] == 'tokenizer.json'
  assert (manifest['tokenizer_sha256'], manifest['vocab_size'], manifest['eos_id']) == (tok.sha256, tok.vocab_size,
                                                                                      tok.eos_id)
  for name in tok.files:
    assert (out / name).read_bytes() == (source / name).read_bytes()
  settings = json.loads((out / 'settings.json').read_text())
  assert settings['tokenizer'] == {'sha256': tok.sha256, 'files': ['tokenizer.json', 'tokenizer_config.json']}
  docs = documents(out)
  assert [ids[-1] for ids in docs] == [tok.eos_id] * len(inputs)
  assert [tok.decode(ids[:-1]) for ids in docs] == [Path(f).read_text().strip('\n') for f in inputs]
  assert (data.token_bytes(out / manifest['tokenizer']) == tok.token_bytes()).all()

  # An equal tokenizer, by file or written otherwise, resumes the directory as it is.
  assert prepare(inputs, out, tokenizer=source / 'tokenizer.json', max_record_tokens=16, workers=1) == manifest
  relaid = copy(source, tmp_path / 'relaid', json.dumps(spec(source), indent=3))
  assert prepare(inputs, out, tokenizer=relaid, max_record_tokens=16, workers=1) == manifest
  with pytest.raises(UserError, match='tokenizer differ'):
    prepare(inputs, out, tokenizer=sp_model, max_record_tokens=16, workers=1)

  # --overwrite deletes salt's files, the tokenizer's among them, and nothing else.
  (out / 'notes.md').write_text('mine')
  (out / 'tokenizer.json.bak').write_text('mine too')
  redone = prepare(inputs[:1], out, tokenizer=sp_model, workers=1, overwrite=True)
  assert redone['tokenizer'] == 'tokenizer.model'
  assert sorted(p.name for p in out.iterdir() if not p.name.startswith(('train-', 'settings.json.lock'))) == [
      'manifest.json', 'notes.md', 'settings.json', 'tokenizer.json.bak', 'tokenizer.model']


def test_prepare_never_writes_over_a_tokenizer_config_it_did_not_write(hf_dirs, tmp_path):
  (tmp_path / 'in').mkdir()
  inputs = write_corpus(tmp_path / 'in', 1, seed=13)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'tokenizer_config.json').write_text('{"mine": true}')
  for overwrite in (False, True):
    with pytest.raises(UserError, match='holds tokenizer_config.json, which salt would write but did not write here'):
      prepare(inputs, out, tokenizer=hf_dirs['unigram'], workers=1, overwrite=overwrite)
  assert (out / 'tokenizer_config.json').read_text() == '{"mine": true}'


def test_a_model_vocabulary_padded_past_the_tokenizer_is_accepted_and_a_smaller_one_refused(tmp_path):
  manifest = {'vocab_size': 151_665, 'tokenizer_sha256': 'ab' * 32}
  config = tiny_config(tmp_path)
  config.data.tokenizer_sha256 = 'ab' * 32
  for padded in (151_665, 151_936):
    config.model.vocab_size = padded
    check_tokenizer(config, manifest, tmp_path)
  config.model.vocab_size = 151_664
  with pytest.raises(UserError, match=r'^model.vocab_size=151664 but the tokenizer of .* has 151665 tokens; '
                                      r'set --config.model.vocab_size=151665$'):
    check_tokenizer(config, manifest, tmp_path)
  config.model.vocab_size, config.data.tokenizer_sha256 = 151_936, 'cd' * 32
  with pytest.raises(UserError, match=r'was tokenized with tokenizer ababababab'):
    check_tokenizer(config, manifest, tmp_path)
