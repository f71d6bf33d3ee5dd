"""A tiny Llama-style model on the embedded Shakespeare corpus; trains on a laptop CPU.

    salt train --config configs/demo.py --workdir runs/demo

`make demo` runs exactly this. With no `data.path` the corpus is downloaded once and
prepared with a 2048-token sentencepiece vocabulary; three whole plays are held out.

    salt train --config configs/demo.py:slm --workdir runs/slm

trains the small model (SLM) of the same tokenizer, the teacher for SALT's stage 1.
"""

from trainer.config import defaults


def get_config(arg=None):
  if arg not in (None, 'slm'):
    raise ValueError(f"configs/demo.py takes no argument or 'slm', got {arg!r}")
  c = defaults()
  c.total_steps = 450
  c.model.update(
      vocab_size=2048,
      d_model=256,
      n_layers=4,
      n_heads=4,
      n_kv_heads=2,
      head_dim=64,
      d_ff=768,
      tie_embeddings=True,
      dtype='float32',  # CPUs have no fast bf16 matmul
  )
  c.data.update(seq_len=256, global_batch_size=8)
  c.optim.update(lr=2e-3, warmup_steps=30, weight_decay=0.1)
  c.loss.vocab_chunk = 1024
  c.eval.update(every_steps=150, batches=16)
  c.log.every_steps = 20
  if arg == 'slm':
    c.model.update(d_model=128, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=384)
  return c
