"""The demo: a tiny Llama-style student, its small teacher (SLM) and SALT, on a laptop CPU.

    salt demo --workdir runs/demo          (what `make demo` runs: all of the below, and a report)

    salt train --config configs/demo.py:slm --workdir runs/demo/slm
    salt score --teacher runs/demo/slm/checkpoints/300 --data DATA --every 4 --output runs/demo/scores.npy
    salt train --config configs/demo.py --workdir runs/demo/baseline
    salt train --config configs/demo.py:salt --workdir runs/demo/salt

With no `data.path` the embedded Shakespeare corpus is downloaded once and prepared
with a 2048-token sentencepiece vocabulary (DATA: ~/.cache/salt/shakespeare/
prepared-f1-v2048); three whole plays are held out for validation, and the few-shot
tasks every evaluation scores are built from them (~/.cache/salt/shakespeare/tasks).
"""

from trainer.config import defaults

SLM_STEPS = 300


def get_config(arg=None):
  if arg not in (None, 'slm', 'salt'):
    raise ValueError(f"configs/demo.py takes no argument, 'slm' or 'salt', got {arg!r}")
  c = defaults()
  c.total_steps = 240
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
  # Beside the loss, few-shot accuracy on two tasks of the held-out plays (trainer/corpus.py),
  # 2 demonstrations each: 800 rows of the model per evaluation.
  c.eval.update(every_steps=20, batches=8, tasks='next_line,next_speaker', task_shots=2)
  c.log.every_steps = 20
  if arg == 'slm':
    # Smaller than the student (a fifth of the parameters, a quarter of the step time).
    c.total_steps = SLM_STEPS
    c.model.update(d_model=128, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=384)
    c.eval.every_steps = 100
  if arg == 'salt':
    c.salt.update(teacher=f'runs/demo/slm/checkpoints/{SLM_STEPS}', n_kd=80, weight=0.5, schedule='constant')
    c.data.selection.scores = 'runs/demo/scores.npy'
  return c
