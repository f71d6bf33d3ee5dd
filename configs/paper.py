"""The SALT paper's pair at pod scale: a ~1.5B SLM and a ~2.8B LLM, Llama-style.

    salt train --config configs/paper.py:llm --config.data.path=DIR --workdir DIR
    salt train --config configs/paper.py:slm --config.data.path=DIR --workdir DIR

DIR for data is a directory written by `salt prepare` with a 32,000-token vocabulary.
Sizes follow the paper (arXiv 2410.18779): 1.5B small model, 2.8B large model,
~208K steps of 2048-token sequences. Parameters and optimizer state are sharded over
all devices (fsdp=-1); add tensor parallelism with --config.mesh.tensor=N.
"""

from trainer.config import defaults

SIZES = {
    # d_model, n_layers, n_heads, d_ff: 1.47B and 2.77B parameters with the vocabulary.
    'slm': dict(d_model=2048, n_layers=26, n_heads=16, n_kv_heads=16, head_dim=128, d_ff=5632),
    'llm': dict(d_model=2560, n_layers=32, n_heads=20, n_kv_heads=20, head_dim=128, d_ff=7168),
}


def get_config(arg=None):
  size = arg or 'llm'
  if size not in SIZES:
    raise ValueError(f'configs/paper.py takes one of {sorted(SIZES)}, got {size!r}')
  c = defaults()
  c.total_steps = 208_000
  # save_matmuls: the best measured for the 1.47B student on one H200 at 16 x 2048, 28.7%
  # MFU against 26.8% for save_nothing (2026-11-26, XLA attention; BENCHMARKS.md).
  c.model.update(vocab_size=32000, rope_theta=10000.0, dtype='bfloat16', remat='save_matmuls', **SIZES[size])
  c.data.update(seq_len=2048, global_batch_size=256)
  c.optim.update(lr=3e-4, min_lr_ratio=0.1, warmup_steps=2000, decay='cosine', weight_decay=0.1)
  c.loss.vocab_chunk = 8192
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.eval.update(every_steps=2000, batches=64)
  c.log.every_steps = 50
  return c
