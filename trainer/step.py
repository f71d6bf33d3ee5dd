"""Train state, its sharded initialisation, and the jitted train and eval steps.

The state is a pytree of arrays; the steps are pure functions of (state, batch). The
model's structure (an NNX GraphDef) is static and closed over, so `jax.jit` sees only
arrays with explicit shardings: the same program on one CPU, a GPU host or a pod.

Shapes in names: B batch, L sequence, T = B * L tokens, D model width, G the teacher's
width, V vocabulary.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from kernels import TokenLosses, ce_and_rank
from kernels.attention import Attention
from trainer import sharding
from trainer.model import ModelConfig, Transformer

Batch = dict[str, jax.Array]
# (h_TxD, w_DxV, targets_T, teacher (h_t_TxG, w_t_GxV) | None, g_ce_T, g_kd_T | None,
#  tau=, teacher_top_k=) -> (sum_t g_ce CE + g_kd KD, TokenLosses): kernels.weighted_loss with the
# config's implementation and mesh bound.
LossFn = Callable[..., tuple[jax.Array, TokenLosses]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's structure and parameter shapes, without allocating anything."""
  with nnx.use_eager_sharding(False):
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules: sharding.Rules) -> nnx.State:
  """Where each parameter lives: its logical axes (the model's annotations) by the rules."""
  logical = jax.tree.map(tuple, nnx.get_partition_spec(abstract_params))
  return sharding.tree_shardings(abstract_params, logical, mesh, rules)


def state_shardings(abstract_params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: sharding.Rules) -> TrainState:
  """Where every array of the train state lives: parameters by their logical axes,
  optimizer moments like the parameters they track, scalars replicated."""
  params = param_shardings(abstract_params, mesh, rules)
  opt_state = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), params,
      transform_non_params=lambda _: sharding.replicated(mesh))
  return TrainState(step=sharding.replicated(mesh), params=params, opt_state=opt_state)


def _fresh_state(cfg: ModelConfig, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
  with nnx.use_eager_sharding(False):
    _, params = nnx.split(Transformer(cfg, nnx.Rngs(key)))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
               shardings: TrainState) -> TrainState:
  """A fresh train state, each array created directly in its shards."""
  return jax.jit(functools.partial(_fresh_state, cfg, tx), out_shardings=shardings)(jax.random.key(seed))


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  """Shapes, dtypes and shardings of the train state: the target a checkpoint restores into."""
  shapes = jax.eval_shape(functools.partial(_fresh_state, cfg, tx), jax.random.key(0))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


@dataclasses.dataclass(frozen=True)
class Distillation:
  """How stage 1 mixes the teacher in: loss = (1 - w) CE + w KD, w = weight(step)."""
  teacher_graphdef: nnx.GraphDef
  teacher_attention: Attention
  weight: Callable[[jax.Array], jax.Array]
  tau: float = 1.0
  tau_squared: bool = False
  teacher_top_k: int = 0


def hidden_and_unembedding(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch,
            attention: Attention) -> tuple[jax.Array, jax.Array]:
  """[B*L, D] final hidden states and the [D, V] unembedding of a model."""
  model = nnx.merge(graphdef, params)
  h_BxLxD = model(batch['inputs'], batch['positions'], batch['segment_ids'], attention)
  return h_BxLxD.reshape(-1, h_BxLxD.shape[-1]), model.unembedding()


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    losses: LossFn, attention: Attention, skip_nonfinite: bool = False,
                    distillation: Distillation | None = None, micro_batches: int = 1):
  """The train step: (state, batch) -> (state, metrics), or (state, batch, teacher_params)
  -> (state, metrics) for stage 1 when `distillation` is given.

  With `micro_batches` > 1 the batch's gradient is summed over that many parts, one at a
  time (activations, teacher pass included, for one part only), for the same update as
  the whole batch at once: every token is weighed against the whole batch's token count.
  With `skip_nonfinite`, a batch whose loss or gradient is not finite leaves parameters
  and optimizer state as they were (metric `skipped` = 1).
  """

  def loss_fn(params, batch, teacher_params, w, tokens):
    """The batch part's share of the loss, and of each metric: all sum over the parts."""
    h_TxD, w_DxV = hidden_and_unembedding(graphdef, params, batch, attention)
    targets_T, weights_T = batch['targets'].reshape(-1), batch['weights'].reshape(-1)
    # Each token's share of the mean: the loss kernels take it as a constant.
    share_T = weights_T / tokens
    if distillation is None:
      ce, _ = losses(h_TxD, w_DxV, targets_T, None, share_T)
      return ce, {'ce': ce}
    h_t_TxG, w_t_GxV = hidden_and_unembedding(distillation.teacher_graphdef, teacher_params, batch,
                                 distillation.teacher_attention)
    kd_scale = distillation.tau ** 2 if distillation.tau_squared else 1.0
    loss, terms = losses(h_TxD, w_DxV, targets_T, (h_t_TxG, w_t_GxV), (1 - w) * share_T, w * kd_scale * share_T,
                         tau=distillation.tau, teacher_top_k=distillation.teacher_top_k)
    return loss, {'ce': (terms.ce * share_T).sum(), 'kd': (terms.kd * share_T).sum(),
                  'teacher_ce': (terms.teacher_ce * share_T).sum(), 'top1_agreement': (terms.agree * share_T).sum()}

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def gradient(params, batch, teacher_params, w):
    tokens = jnp.maximum(batch['weights'].sum(), 1.0)
    if micro_batches == 1:
      return grad_fn(params, batch, teacher_params, w, tokens)
    # Part m holds rows m, m + M, ...: each device's rows split evenly over the parts, so
    # every part is spread over all devices as the whole batch is.
    parts = jax.tree.map(lambda x: jnp.moveaxis(x.reshape(-1, micro_batches, *x.shape[1:]), 1, 0), batch)

    def add_part(total, part):
      return jax.tree.map(jnp.add, total, grad_fn(params, part, teacher_params, w, tokens)), None

    first = jax.tree.map(lambda x: x[0], parts)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first, teacher_params, w, tokens))
    return jax.lax.scan(add_part, zeros, parts)[0]

  def train_step(state: TrainState, batch: Batch, teacher_params: nnx.State | None = None):
    w = distillation.weight(state.step) if distillation else 0.0
    (loss, aux), grads = gradient(state.params, batch, teacher_params, w)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state.step),
               'tokens': batch['weights'].sum(), **aux, **({'w': w} if distillation else {})}
    if skip_nonfinite:
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                       (params, opt_state), (state.params, state.opt_state))
      metrics['skipped'] = 1.0 - finite.astype(jnp.float32)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, losses: LossFn, attention: Attention,
                   token_bytes: jax.Array) -> Callable[[nnx.State, Batch], dict]:
  """Sums over a batch: loss (nats), tokens, and the UTF-8 bytes those tokens stand for."""

  def eval_step(params: nnx.State, batch: Batch) -> dict[str, jax.Array]:
    weights = batch['weights']
    h_TxD, w_DxV = hidden_and_unembedding(graphdef, params, batch, attention)
    loss_sum, _ = losses(h_TxD, w_DxV, batch['targets'].reshape(-1), None, weights.reshape(-1))
    return {
        'loss_sum': loss_sum,
        'tokens': weights.sum(),
        'bytes': (jnp.asarray(token_bytes)[batch['targets']] * weights).sum(),
    }

  return eval_step


def make_likelihood_step(graphdef: nnx.GraphDef, attention: Attention,
                         chunk: int) -> Callable[[nnx.State, Batch], tuple[jax.Array, jax.Array]]:
  """Per token, [B, L]: log p(target), and whether the target is the model's most likely
  token (a tie counts as most likely). The evaluation tasks' scores (trainer/tasks.py)."""

  def likelihood_step(params: nnx.State, batch: Batch) -> tuple[jax.Array, jax.Array]:
    h_TxD, w_DxV = hidden_and_unembedding(graphdef, params, batch, attention)
    ce_T, rank_T = ce_and_rank(h_TxD, w_DxV, batch['targets'].reshape(-1), chunk=chunk)
    shape = batch['targets'].shape
    return -ce_T.reshape(shape), (rank_T == 0).reshape(shape)

  return likelihood_step


BATCH_KEYS = ('inputs', 'targets', 'positions', 'segment_ids', 'weights')


def jit_steps(train_step, eval_step, shardings: TrainState, batch_sharding, mesh: Mesh) -> tuple[Any, Any]:
  """Both steps under jit with explicit shardings; the train state is donated."""
  batch_shardings = dict.fromkeys(BATCH_KEYS, batch_sharding)
  replicated = sharding.replicated(mesh)
  train = jax.jit(train_step, in_shardings=(shardings, batch_shardings),
                  out_shardings=(shardings, replicated), donate_argnums=0)
  evaluate = jax.jit(eval_step, in_shardings=(shardings.params, batch_shardings), out_shardings=replicated)
  return train, evaluate


def jit_likelihood_step(likelihood_step, param_shardings: nnx.State, batch_sharding, mesh: Mesh):
  """The likelihood step under jit; its outputs are replicated, so every host reads every row."""
  return jax.jit(likelihood_step, in_shardings=(param_shardings, dict.fromkeys(BATCH_KEYS, batch_sharding)),
                 out_shardings=sharding.replicated(mesh))


def jit_distillation_step(train_step, shardings: TrainState, batch_sharding, teacher_shardings, mesh: Mesh):
  """The stage-1 step under jit: the teacher's parameters are an input, never donated."""
  batch_shardings = dict.fromkeys(BATCH_KEYS, batch_sharding)
  return jax.jit(train_step, in_shardings=(shardings, batch_shardings, teacher_shardings),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
