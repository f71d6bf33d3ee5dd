"""AdamW with warmup and cosine or linear decay, global-norm clipping and a decay mask."""

import jax
import optax
from flax import nnx


def learning_rate_schedule(lr: float, warmup_steps: int, total_steps: int, decay: str,
                           min_lr_ratio: float) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then `decay` ('cosine' or 'linear') to `lr * min_lr_ratio`."""
  end = lr * min_lr_ratio
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  decay_steps = total_steps - warmup_steps
  if decay == 'cosine':
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr_ratio)
  else:
    after = optax.linear_schedule(lr, end, decay_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params: nnx.State) -> nnx.State:
  """Weight decay on the matrices that read or write the model's width only, told by each
  parameter's logical axes (`embed` and another besides the stack of layers), not by its
  name: norm scales and biases ([heads, head_dim] ones too) are not decayed."""
  def is_matrix(axes: tuple) -> bool:
    return 'embed' in axes and sum(a != 'layers' for a in axes) >= 2

  return jax.tree.map(is_matrix, nnx.get_partition_spec(params))


def make_optimizer(schedule: optax.Schedule, *, b1: float, b2: float, eps: float,
                   weight_decay: float, clip_norm: float) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask),
  )
