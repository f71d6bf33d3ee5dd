"""The tokenizers salt reads, behind one interface: sentencepiece models and Hugging Face
`tokenizers` files (tokenizer.json: BPE, byte-level BPE, Unigram, WordPiece), told apart
by what the file holds.

A tokenizer's identity (`sha256`) is a hash of what decides how it tokenizes, not of
its files: equal tokenizers compare equal however their files were written, and a
manifest or checkpoint that records it names the tokenizer its ids mean.
"""

import abc
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import sentencepiece as spm
import tokenizers
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from trainer.errors import UserError

SENTENCEPIECE = 'tokenizer.model'
HUGGINGFACE = 'tokenizer.json'
HUGGINGFACE_CONFIG = 'tokenizer_config.json'
# Where a Hugging Face model names its special ids when tokenizer_config.json does not, in this order.
MODEL_CONFIGS = ('generation_config.json', 'config.json')
SPECIALS = ('eos', 'bos', 'pad')
# The fields of an added token that decide how text is split around it.
ADDED_TOKEN_FIELDS = ('id', 'content', 'special', 'single_word', 'lstrip', 'rstrip', 'normalized')
BYTE_TOKEN = re.compile(r'<0x[0-9A-Fa-f]{2}>')
GIVE = (f'give a sentencepiece model ({SENTENCEPIECE}), a Hugging Face {HUGGINGFACE}, or the model directory '
        'that holds one')


class Tokenizer(abc.ABC):
  """What salt asks of a tokenizer. Ids are what the tokenizer gives for the text alone:
  no BOS, EOS or other special token is added."""

  kind: str  # 'sentencepiece' | 'huggingface'
  files: tuple[str, ...]  # the names of the files that hold it; the first is the one to load
  vocab_size: int  # how many ids it can produce, added tokens included
  eos_id: int
  bos_id: int | None
  pad_id: int | None
  sha256: str  # its identity

  @abc.abstractmethod
  def encode(self, texts: list[str]) -> list[np.ndarray]:
    """Each text's ids (int32), the batch spread over threads."""

  @abc.abstractmethod
  def decode(self, ids) -> str:
    """The text of `ids`; special tokens stand for no text."""

  @abc.abstractmethod
  def id_to_token(self, i: int) -> str:
    """The vocabulary entry of id `i`."""

  @abc.abstractmethod
  def token_bytes(self) -> np.ndarray:
    """[vocab_size] int32: the UTF-8 bytes each id stands for (special tokens 0, byte
    tokens 1), for bits per byte."""

  def newline_ids(self) -> list[int] | None:
    """The ids of a lone newline where a text cut after a newline encodes as its two
    parts do (the part after the cut encoded behind a newline, whose ids are then
    dropped); None where that does not hold, and the text must be encoded whole."""
    return None

  @abc.abstractmethod
  def _contents(self) -> dict[str, bytes]:
    """`files`' names and contents."""

  def copy_to(self, directory: str | Path) -> None:
    """Writes `files` into `directory` (made if need be), each complete under its name or not at all."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    for name, content in self._contents().items():
      target = Path(directory) / name
      partial = target.with_name(name + '.partial')
      partial.write_bytes(content)
      os.replace(partial, target)


def load(path: str | Path) -> Tokenizer:
  """The tokenizer of a sentencepiece model, a tokenizer.json, or a model directory
  (its tokenizer.json where there is one, as transformers' fast tokenizers prefer, else
  its tokenizer.model). Raises UserError for anything else."""
  path = Path(path)
  if path.is_dir():
    found = [path / name for name in (HUGGINGFACE, SENTENCEPIECE) if (path / name).is_file()]
    if not found:
      raise UserError(f'{path} holds neither {HUGGINGFACE} nor {SENTENCEPIECE}; {GIVE}')
    path = found[0]
  elif not path.is_file():
    raise UserError(f'tokenizer {str(path)!r} does not exist; {GIVE}')
  with open(path, 'rb') as f:
    # A serialized ModelProto never begins with '{' (no field of it has that tag).
    is_json = f.read(256).lstrip().startswith(b'{')
  return HuggingFace(path) if is_json else SentencePiece(path)


def _not_a_tokenizer(path: Path) -> UserError:
  return UserError(f'{path} is neither a sentencepiece model nor a Hugging Face {HUGGINGFACE}; {GIVE}')


def sentencepiece_sha256(path: str | Path) -> str:
  """The identity of a sentencepiece model: a hash of what decides how it tokenizes (its
  pieces, their scores and kinds, the normalizer and the encoding algorithm), not of
  fields that only record how it was trained, so equal tokenizers compare equal."""
  model = sp_pb2.ModelProto()
  try:
    model.ParseFromString(Path(path).read_bytes())
  except DecodeError:
    raise UserError(f'{path} is not a sentencepiece model') from None
  spec = model.trainer_spec
  kept = sp_pb2.TrainerSpec(model_type=spec.model_type, byte_fallback=spec.byte_fallback,
                            treat_whitespace_as_suffix=spec.treat_whitespace_as_suffix)
  model.trainer_spec.CopyFrom(kept)
  return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


class SentencePiece(Tokenizer):
  kind = 'sentencepiece'
  files = (SENTENCEPIECE,)

  def __init__(self, path: Path):
    try:
      self._sp = spm.SentencePieceProcessor(model_file=str(path))
    except RuntimeError:
      raise _not_a_tokenizer(path) from None
    self._path = path
    self.vocab_size = self._sp.vocab_size()
    if self._sp.eos_id() < 0:
      raise UserError(f'{path} has no EOS piece, which salt ends every document with; give a model that has one')
    self.eos_id = self._sp.eos_id()
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
    self.sha256 = sentencepiece_sha256(path)

  def encode(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in self._sp.encode(texts)]

  def decode(self, ids) -> str:
    return self._sp.decode(np.asarray(ids).tolist())

  def id_to_token(self, i: int) -> str:
    return self._sp.id_to_piece(i)

  def token_bytes(self) -> np.ndarray:
    sizes = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self._sp.is_byte(i):
        sizes[i] = 1
      elif not (self._sp.is_control(i) or self._sp.is_unknown(i)):
        sizes[i] = len(self._sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
    return sizes

  def newline_ids(self) -> list[int] | None:
    # It holds where the normalizer leaves text as it is and no piece but the newline's
    # holds a newline, so that no token spans the cut.
    model = sp_pb2.ModelProto()
    model.ParseFromString(self._sp.serialized_model_proto())
    normalizer = model.normalizer_spec
    if normalizer.name != 'identity' or normalizer.remove_extra_whitespaces or normalizer.precompiled_charsmap:
      return None
    if any('\n' in p.piece and p.piece != '\n' for p in model.pieces):
      return None
    newline = self._sp.encode('\n')
    return newline if self._sp.encode('\nx')[:len(newline)] == newline else None

  def _contents(self) -> dict[str, bytes]:
    return {SENTENCEPIECE: self._path.read_bytes()}


class HuggingFace(Tokenizer):
  """A tokenizer.json, with the special tokens its tokenizer_config.json names (or, where
  that names no EOS, the ids of generation_config.json or config.json beside it)."""

  kind = 'huggingface'
  files = (HUGGINGFACE, HUGGINGFACE_CONFIG)

  def __init__(self, path: Path):
    text = path.read_text(encoding='utf-8', errors='replace')
    try:
      self._spec = json.loads(text)
      self._tok = tokenizers.Tokenizer.from_str(text)
    except Exception:  # json's ValueError, or the bare Exception tokenizers raises
      raise _not_a_tokenizer(path) from None
    # A tokenizer.json may ship with truncation or padding on: a document is encoded whole.
    self._tok.no_truncation()
    self._tok.no_padding()
    self._path = path
    self._vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(self._vocab.values(), default=-1) + 1
    specials, self._config = self._special_ids()
    self.eos_id, self.bos_id, self.pad_id = (specials[k] for k in SPECIALS)
    self.sha256 = _huggingface_sha256(self._spec, self.eos_id)

  def _special_ids(self) -> tuple[dict[str, int | None], bytes]:
    """EOS, BOS and pad ids, and the tokenizer_config.json that names them."""
    config_path = self._path.with_name(HUGGINGFACE_CONFIG)
    config = _read_json(config_path) if config_path.is_file() else {}
    if _content(config.get('eos_token')) is not None:
      ids = {k: self._token_id(_content(config.get(f'{k}_token')), config_path, k) for k in SPECIALS}
      return ids, config_path.read_bytes()
    for source in (self._path.with_name(name) for name in MODEL_CONFIGS):
      model_config = _read_json(source) if source.is_file() else {}
      if _first(model_config.get('eos_token_id')) is not None:
        ids = {k: self._checked_id(_first(model_config.get(f'{k}_token_id')), source, k) for k in SPECIALS}
        # The copy names them in its tokenizer_config.json, so that it needs no model config.
        named = {f'{k}_token': None if i is None else self._tok.id_to_token(i) for k, i in ids.items()}
        return ids, json.dumps({**config, **named}, indent=2, ensure_ascii=False).encode('utf-8')
    raise UserError(f'no EOS token is named for {self._path}; add "eos_token": "<its end-of-text token>" to '
                    f'{config_path}')

  def _token_id(self, content: str | None, source: Path, kind: str) -> int | None:
    if content is None:
      return None
    i = self._tok.token_to_id(content)
    if i is None:
      raise UserError(f'{source} names {kind}_token {content!r}, which is not in the vocabulary of {self._path}')
    return i

  def _checked_id(self, i, source: Path, kind: str) -> int | None:
    if i is not None and not (isinstance(i, int) and 0 <= i < self.vocab_size):
      raise UserError(f'{source} names {kind}_token_id {i!r}, but {self._path} has ids 0..{self.vocab_size - 1}')
    return i

  def encode(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode(np.asarray(ids).tolist())

  def id_to_token(self, i: int) -> str:
    return self._tok.id_to_token(i)

  def token_bytes(self) -> np.ndarray:
    model = self._spec['model']
    added = {t['id']: t for t in self._spec.get('added_tokens') or []}
    special = {i for i, t in added.items() if t.get('special')} | {i for i in (self.eos_id, self.bos_id, self.pad_id,
                                                                                 self._unknown_id()) if i is not None}
    byte_level = _has_type(self._spec.get('pre_tokenizer'), 'ByteLevel') or _has_type(self._spec.get('decoder'),
                                                                                      'ByteLevel')
    # Byte-level BPE writes each byte as one character of GPT-2's bytes-to-unicode table.
    alphabet = set(tokenizers.pre_tokenizers.ByteLevel.alphabet()) if byte_level else set()
    prefix = model.get('continuing_subword_prefix') or ''
    sizes = np.zeros(self.vocab_size, np.int32)
    for token, i in self._vocab.items():
      if i in special:
        continue
      if i in added:  # an added token is matched in the text as it is written
        sizes[i] = len(token.encode('utf-8'))
      elif byte_level:
        sizes[i] = sum(1 if c in alphabet else len(c.encode('utf-8')) for c in token)
      elif model.get('byte_fallback') and BYTE_TOKEN.fullmatch(token):
        sizes[i] = 1
      else:
        if prefix and token.startswith(prefix) and token != prefix:  # WordPiece's '##': within a word
          token = token[len(prefix):]
        sizes[i] = len(token.replace('\u2581', ' ').encode('utf-8'))  # Metaspace's '▁' is a space
    return sizes

  def _unknown_id(self) -> int | None:
    model = self._spec['model']
    if 'unk_id' in model:  # Unigram
      return model['unk_id']
    return self._tok.token_to_id(model['unk_token']) if model.get('unk_token') else None

  def _contents(self) -> dict[str, bytes]:
    return {HUGGINGFACE: self._path.read_bytes(), HUGGINGFACE_CONFIG: self._config}


def _huggingface_sha256(spec: dict, eos_id: int) -> str:
  """A hash of what decides how a tokenizer.json tokenizes (its model, normalizer,
  pre-tokenizer and added tokens) and of its EOS: not of the decoder, post-processor,
  truncation, padding, or how the JSON is laid out."""
  model = dict(spec['model'])
  if isinstance(model.get('merges'), list):
    # Older files write a merge as "a b", newer ones as ["a", "b"]: the same merge.
    model['merges'] = [m.split(' ', 1) if isinstance(m, str) else m for m in model['merges']]
  added = sorted(({k: t.get(k) for k in ADDED_TOKEN_FIELDS} for t in spec.get('added_tokens') or []),
                 key=lambda t: t['id'])
  decisive = {'model': model, 'normalizer': spec.get('normalizer'), 'pre_tokenizer': spec.get('pre_tokenizer'),
              'added_tokens': added, 'eos_id': eos_id}
  return hashlib.sha256(json.dumps(decisive, sort_keys=True, separators=(',', ':')).encode()).hexdigest()


def _read_json(path: Path) -> dict:
  try:
    content = json.loads(path.read_text(encoding='utf-8'))
  except (UnicodeDecodeError, ValueError) as e:
    raise UserError(f'{path} is not JSON ({e})') from None
  if not isinstance(content, dict):
    raise UserError(f'{path} is not a JSON object')
  return content


def _content(token) -> str | None:
  """A token as tokenizer_config.json names it: a string, or an AddedToken's {"content": ...}."""
  return token.get('content') if isinstance(token, dict) else token


def _first(ids):
  """An id as a model config names it: an int, or a list whose first is the main one."""
  if isinstance(ids, list):
    return ids[0] if ids else None
  return ids


def _has_type(component, kind: str) -> bool:
  """Whether a tokenizer.json component, or one it holds (a Sequence's), is of type `kind`."""
  if isinstance(component, dict):
    return component.get('type') == kind or any(_has_type(v, kind) for v in component.values())
  if isinstance(component, list):
    return any(_has_type(v, kind) for v in component)
  return False
