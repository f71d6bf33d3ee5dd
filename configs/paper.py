"""The SALT paper's runs at pod scale (arXiv 2410.18779): its model pairs and its arms.

    salt train --config configs/paper.py:PRESET --config.data.path=DATA --workdir RUN

PRESET is MODEL or MODEL_ARM:
  slm                 the 1.5B small model, trained as an ordinary LM (the teacher of llm_*)
  llm, llm8b          the 2.8B and 8.6B models; llm (trained as llm_baseline) is llm8b's teacher
  ARM                 baseline  next-token training only
                      rkd       distillation from the small model throughout (n_kd = all steps)
                      salt      distillation for the first n_kd steps, then next-token training
                      salt_ds   salt, stage 1 reading only the records the small model selects
The arms differ in salt.n_kd and data.selection alone. Distilling arms need the small
model: --config.salt.teacher=SLM_RUN/checkpoints/STEP; salt_ds needs its scores,
`salt score --teacher ... --data DATA --top-k 10` (written to DATA/scores.npy, read
from there). DATA is a directory written by `salt prepare` with a 32,000-token vocabulary.

Sources. The paper's text was not at hand when these presets were written; the values
marked [paper] are as its OpenReview reviews (ICLR 2026 submission 21184) quote it, to be
checked against the paper. Values marked [ours] are not stated in what we could read, and
say why ours was chosen. The README lists the deviations from the paper's setup.
"""

import ml_collections

from trainer.config import defaults

# Llama-style shapes [ours]: the paper's text we read gives parameter counts only.
SIZES = {
    # [paper] a 1.5B SLM teaches a 2.8B LLM; here 1.47B and 2.77B with the vocabulary.
    'slm': dict(d_model=2048, n_layers=26, n_heads=16, n_kv_heads=16, head_dim=128, d_ff=5632),
    'llm': dict(d_model=2560, n_layers=32, n_heads=20, n_kv_heads=20, head_dim=128, d_ff=7168),
    # [paper] an 8.6B LLM taught by the 2.8B model; here 8.59B with the vocabulary.
    'llm8b': dict(d_model=4096, n_layers=41, n_heads=32, n_kv_heads=32, head_dim=128, d_ff=11008),
}
ARMS = ('baseline', 'rkd', 'salt', 'salt_ds')
# [paper] 208K steps: the reviews quote 146K steps as ~70% of training. For llm8b the
# paper's count was not in what we read [ours: the same].
TOTAL_STEPS = 208_000
# [paper] n_KD = 36K of the 2.8B model's steps (Appendix K ablates 20K-60K; 36K chosen
# for efficiency). For llm8b [ours: the same].
N_KD = 36_000
# [paper] SALT_DS scores each sequence by the median of its per-token losses over the
# tokens whose target is in the SLM's top k = 10 (Eq. 10): `salt score --top-k 10`.
SCORE_TOP_K = 10


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size, _, arm = (arg or 'llm').partition('_')
  arm = arm or 'baseline'
  if size not in SIZES or arm not in ARMS or (size == 'slm' and arm != 'baseline'):
    presets = ['slm'] + [f'{s}_{a}' for s in SIZES if s != 'slm' for a in ARMS]
    raise ValueError(f'configs/paper.py takes one of {", ".join(presets)} (or llm, llm8b), got {arg!r}')
  c = defaults()
  c.total_steps = TOTAL_STEPS
  # save_matmuls: the best measured for the 1.47B model on one H200 at 16 x 2048, 28.7%
  # MFU against 26.8% for save_nothing (2026-11-26, XLA attention; BENCHMARKS.md).
  c.model.update(vocab_size=32000, rope_theta=10000.0, dtype='bfloat16', remat='save_matmuls', **SIZES[size])
  # [ours] 256 sequences of 2048 tokens (0.5M tokens a step), a common batch at this
  # scale; [ours] AdamW, peak 3e-4, cosine to 10% after 2,000 warm-up steps, decay 0.1.
  c.data.update(seq_len=2048, global_batch_size=256)
  c.optim.update(lr=3e-4, min_lr_ratio=0.1, warmup_steps=2000, decay='cosine', weight_decay=0.1)
  c.loss.vocab_chunk = 8192
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.eval.update(every_steps=2000, batches=64)
  c.log.every_steps = 50
  if arm != 'baseline':
    # [paper] stage 1 = KD from the SLM, then (salt) plain training; rkd distills throughout.
    # [ours] w = 0.5 held constant in stage 1 and tau = 1: the reviews we read do not quote
    # the paper's w or tau; 0.5 weighs the two losses alike, and constant is the step
    # transition the paper names SALT (its linear variants: salt.schedule).
    c.salt.update(n_kd=TOTAL_STEPS if arm == 'rkd' else N_KD, weight=0.5, schedule='constant', tau=1.0)
  if arm == 'salt_ds':
    # [paper] selection applies to the KD stage only, keeping high scores. [ours] the top
    # half of the scored records: the fraction kept is not in what we read, and a half
    # leaves stage 1 (36K x 256 rows) well within one pass over a Pile-sized corpus.
    c.data.selection.update(scores='scores.npy', rule='top', keep_fraction=0.5)
  return c
