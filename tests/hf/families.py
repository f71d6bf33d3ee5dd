"""Tiny random models of the families salt imports, made and saved by transformers itself,
each with a tiny tokenizer of the kind its family ships, trained on tests.helpers' corpus;
and the session's Zoo of them and of what salt makes of them.

  llama2   Llama, untied; a sentencepiece tokenizer.model (as Llama 2 and TinyLlama)
  llama3   Llama 3.1, untied, llama3 RoPE; byte-level BPE, special tokens after the vocabulary
  smollm2  Llama, tied embeddings (as SmolLM2 and Llama 3.2 1B); byte-level BPE, special tokens first
  mistral  Mistral with a sliding window of 4; tokenizer.model and the tokenizer.json transformers makes of it
  qwen2    Qwen2 (q/k/v biases), its vocabulary padded past the tokenizer's (as Qwen2.5); byte-level BPE, NFC
  gemma3   Gemma 3 text: sliding-window and global layers with their own RoPE bases, q/k norms,
           post-norms, tied; a Metaspace BPE with byte fallback in tokenizer.json

Weights are bfloat16 values (saved as float32), as a model trained in bf16 has: salt's
teacher holds them in bf16 without rounding, so its logits can be held to transformers'
at float32 precision. Norms are moved away from their identity, and biases from zero, so
that each one matters.
"""

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers.utils import import_utils

from tests.helpers import write_corpus
from tests.hf import RECORD_TOKENS, SEQ_LEN
from trainer.hf_export import export
from trainer.hf_import import import_teacher
from trainer.prepare import prepare

# transformers 5 requires Hugging Face's `kernels` package, and its modeling code imports
# it where it finds it: salt's own top-level `kernels` package, first on sys.path here,
# takes its name. Until salt's package has a name of its own, transformers is told that
# hub kernels, GPU code it never runs on CPU, are not installed.
import_utils.is_kernels_available = transformers.utils.is_kernels_available = lambda *_, **__: False

# A document of what the corpus lacks: bytes beyond ASCII, digits, runs of spaces, a tab, a blank line.
EXTRA_DOCUMENT = 'Naïve café — 1234 crowns  and  two spaces,\ttabs, 🙂 and 東京.\n\n  An indented line after a blank one.'
SLIDING_WINDOW = 4
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r'\p{N}{1,3}', r'\p{N}')
QWEN2_VOCAB = 320  # the model's rows; its tokenizer has 300 tokens


def corpus(directory: Path) -> list[str]:
  """The tokenizers' training text: 20 documents, about 13 KB."""
  directory.mkdir(parents=True)
  return [Path(p).read_text() for p in write_corpus(directory, 20, seed=7)]


def sentencepiece_model(texts: list[str], vocab_size: int) -> bytes:
  """A BPE sentencepiece model as Llama 2's and Mistral's: no normalization, a dummy
  prefix, digits split, bytes for what it lacks; <unk> 0, <s> 1, </s> 2."""
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([line for text in texts for line in text.split('\n')]), model_writer=writer,
      vocab_size=vocab_size, model_type='bpe', byte_fallback=True, split_digits=True,
      normalization_rule_name='identity', remove_extra_whitespaces=False, minloglevel=2)
  return writer.getvalue()


def save_sentencepiece(texts: list[str], directory: Path) -> None:
  """tokenizer.model and the tokenizer_config.json that has transformers load it as LlamaTokenizer."""
  directory.mkdir(parents=True)
  (directory / 'tokenizer.model').write_bytes(sentencepiece_model(texts, 320))
  (directory / 'tokenizer_config.json').write_text(json.dumps({
      'tokenizer_class': 'LlamaTokenizer', 'add_bos_token': True, 'add_eos_token': False, 'bos_token': '<s>',
      'eos_token': '</s>', 'unk_token': '<unk>'}))


def byte_level(texts: list[str], vocab_size: int, split: str | None, *, specials: list[str],
               specials_first: bool, nfc: bool = False) -> Tokenizer:
  """A byte-level BPE as GPT-2's (`split` None) or Llama 3's and Qwen2's (their regex, then bytes)."""
  tokenizer = Tokenizer(models.BPE())
  if nfc:
    tokenizer.normalizer = normalizers.NFC()
  if split is None:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - (0 if specials_first else len(specials)),
                                special_tokens=specials if specials_first else [],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tokenizer.train_from_iterator(texts, trainer)
  if not specials_first:
    tokenizer.add_special_tokens(specials)
  return tokenizer


def metaspace_byte_fallback(texts: list[str], vocab_size: int) -> Tokenizer:
  """A BPE over '▁'-marked words with byte fallback, as Gemma's tokenizer.json: <pad> 0,
  <eos> 1, <bos> 2, <unk> 3, then <0x00>..<0xFF>, then the merged pieces; BOS added."""
  specials = ['<pad>', '<eos>', '<bos>', '<unk>']
  tokenizer = Tokenizer(models.BPE(unk_token='<unk>'))
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme='never')
  tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials,
                                                           show_progress=False))
  spec = json.loads(tokenizer.to_str())
  learned = sorted(spec['model']['vocab'].items(), key=lambda item: item[1])[len(specials):]
  pieces = specials + [f'<0x{b:02X}>' for b in range(256)] + [piece for piece, _ in learned]
  spec['model'].update(vocab={piece: i for i, piece in enumerate(pieces)}, byte_fallback=True)
  tokenizer = Tokenizer.from_str(json.dumps(spec))
  tokenizer.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse()])
  tokenizer.post_processor = processors.TemplateProcessing(single='<bos> $A', special_tokens=[('<bos>', 2)])
  return tokenizer


def save_tokenizer(name: str, texts: list[str], directory: Path) -> None:
  """The family's tokenizer in `directory`, saved as transformers saves it."""
  if name in ('llama2', 'mistral'):
    save_sentencepiece(texts, directory)
    if name == 'mistral':  # Mistral's repositories hold the tokenizer.json converted from it too
      transformers.AutoTokenizer.from_pretrained(directory).save_pretrained(directory)
    return
  if name == 'llama3':
    tokenizer = byte_level(texts, 320, LLAMA3_SPLIT, specials=['<|begin_of_text|>', '<|end_of_text|>'],
                           specials_first=False)
    bos = '<|begin_of_text|>'
    tokenizer.post_processor = processors.TemplateProcessing(single=f'{bos} $A',
                                                             special_tokens=[(bos, tokenizer.token_to_id(bos))])
    special = dict(bos_token=bos, eos_token='<|end_of_text|>')
  elif name == 'smollm2':
    tokenizer = byte_level(texts, 288, None, specials=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                           specials_first=True)
    special = dict(bos_token='<|endoftext|>', eos_token='<|endoftext|>')
  elif name == 'qwen2':
    tokenizer = byte_level(texts, 300, QWEN2_SPLIT, specials=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                           specials_first=False, nfc=True)
    special = dict(eos_token='<|endoftext|>', pad_token='<|endoftext|>')
  else:
    tokenizer = metaspace_byte_fallback(texts, 352)
    special = dict(bos_token='<bos>', eos_token='<eos>', pad_token='<pad>', unk_token='<unk>')
  transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special).save_pretrained(directory)


def model_config(name: str, tokenizer) -> transformers.PretrainedConfig:
  """The family's config at a tiny size; the vocabulary is the tokenizer's (Qwen2's padded past it)."""
  ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
             pad_token_id=tokenizer.pad_token_id)
  size = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=SEQ_LEN,
              initializer_range=0.1, **ids)
  if name in ('llama2', 'smollm2'):
    return transformers.LlamaConfig(**size, rms_norm_eps=1e-5, rope_theta=10000.0,
                                    tie_word_embeddings=name == 'smollm2')
  if name == 'llama3':
    return transformers.LlamaConfig(**size, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters={
        'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 4.0, 'low_freq_factor': 1.0,
        'high_freq_factor': 4.0, 'original_max_position_embeddings': 8})
  if name == 'mistral':
    return transformers.MistralConfig(**size, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=SLIDING_WINDOW)
  if name == 'qwen2':
    return transformers.Qwen2Config(**{**size, 'vocab_size': QWEN2_VOCAB}, rms_norm_eps=1e-6, rope_theta=1e6,
                                    tie_word_embeddings=False)
  # Three layers, sliding-window ones around a global one.
  return transformers.Gemma3TextConfig(**{**size, 'num_hidden_layers': 3}, rms_norm_eps=1e-6,
                                       query_pre_attn_scalar=16, sliding_window=SLIDING_WINDOW,
                                       sliding_window_pattern=2, rope_theta=1e6, rope_local_base_freq=1e4)


def random_model(config: transformers.PretrainedConfig, seed: int = 0) -> transformers.PreTrainedModel:
  """The family's model with random weights, its norms and biases moved off their defaults,
  every value a bfloat16 one."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  gemma = config.model_type == 'gemma3_text'
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight') and gemma:
        # Gemma scales by 1 + w: w and 1 + w are both bfloat16 values, whichever salt holds.
        p.copy_(torch.randint(-32, 33, p.shape) / 128)
      elif name.endswith('norm.weight'):
        p.copy_(1 + 0.25 * torch.randn(p.shape))
      elif name.endswith('.bias'):
        p.copy_(0.5 * torch.randn(p.shape))
      p.copy_(p.to(torch.bfloat16).float())
  return model.eval()


def build(name: str, root: Path) -> Path:
  """The family's model directory, root/model: config.json, model.safetensors, generation
  config and tokenizer files, as transformers writes them."""
  directory = root / 'model'
  save_tokenizer(name, corpus(root / 'corpus'), directory)
  config = model_config(name, transformers.AutoTokenizer.from_pretrained(directory))
  random_model(config).save_pretrained(directory)
  return directory


def load(directory: Path, **overrides) -> transformers.PreTrainedModel:
  """The model in `directory` as transformers runs it: float32, eager attention, no hub
  kernels; `overrides` change its config."""
  return transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation='eager', use_kernels=False, **overrides).eval()


def logits(model: transformers.PreTrainedModel, ids_BxL: np.ndarray, positions_BxL: np.ndarray | None = None,
           ) -> np.ndarray:
  """float32 [B, L, V]; positions 0.. unless given."""
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(np.asarray(ids_BxL, np.int64)),
                position_ids=None if positions_BxL is None else torch.as_tensor(np.asarray(positions_BxL, np.int64)))
  return out.logits.float().numpy()


def loss(model: transformers.PreTrainedModel, ids_L: np.ndarray) -> float:
  """transformers' own next-token cross-entropy of one sequence, its mean over the tokens."""
  ids = torch.as_tensor(np.asarray(ids_L, np.int64))[None]
  with torch.no_grad():
    return float(model(input_ids=ids, labels=ids).loss)


def _fresh(path: Path) -> Path:
  """`path`, emptied of what an attempt that failed left."""
  shutil.rmtree(path, ignore_errors=True)
  return path


class Zoo:
  """Each family's model directory, and what salt makes of it (imported teacher, prepared
  data, export), each made once a session when a test first needs it. What fails is not
  kept: each test that needs it fails with salt's error."""

  load, logits, loss = staticmethod(load), staticmethod(logits), staticmethod(loss)
  load_tokenizer = staticmethod(transformers.AutoTokenizer.from_pretrained)

  def __init__(self, root: Path):
    self.root = root
    self._made = {}

  def _once(self, key: tuple, make: Callable):
    if key not in self._made:
      self._made[key] = make()
    return self._made[key]

  def model_dir(self, name: str) -> Path:
    return self._once(('model_dir', name), lambda: build(name, self.root / name))

  def model(self, name: str) -> transformers.PreTrainedModel:
    """The family's model as transformers loads it from its directory (shared: do not change it)."""
    return self._once(('model', name), lambda: load(self.model_dir(name)))

  def tokenizer(self, name: str):
    return self._once(('tokenizer', name), lambda: transformers.AutoTokenizer.from_pretrained(self.model_dir(name)))

  def documents(self) -> list[Path]:
    """salt prepare's inputs: six corpus documents and EXTRA_DOCUMENT, a .txt file each."""
    def write() -> list[Path]:
      directory = self.root / 'documents'
      directory.mkdir()
      (directory / 'extra.txt').write_text(EXTRA_DOCUMENT)
      return [Path(p) for p in write_corpus(directory, 6, seed=3)] + [directory / 'extra.txt']
    return self._once(('documents',), write)

  def teacher(self, name: str) -> str:
    """`salt import-teacher MODEL_DIR OUT`: the checkpoint."""
    return self._once(('teacher', name), lambda: import_teacher(
        self.model_dir(name), _fresh(self.root / name / 'teacher'))['checkpoint'])

  def prepared(self, name: str) -> Path:
    """`salt prepare DOCUMENTS --tokenizer MODEL_DIR`: the data directory."""
    def make() -> Path:
      output = _fresh(self.root / name / 'data')
      prepare([str(p) for p in self.documents()], output, tokenizer=self.model_dir(name),
              max_record_tokens=RECORD_TOKENS, workers=1)
      return output
    return self._once(('prepared', name), make)

  def exported(self, name: str) -> Path:
    """`salt export` of the imported teacher: the Hugging Face directory."""
    def make() -> Path:
      output = _fresh(self.root / name / 'exported')
      export(self.teacher(name), output)
      return output
    return self._once(('exported', name), make)
