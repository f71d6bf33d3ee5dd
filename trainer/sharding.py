"""The device mesh and the map from logical axis names to mesh axes.

Parameters name their axes logically (`embed`, `mlp`, ...); a rule table from the
config says which mesh axes each logical axis is split over. The same program then
runs on 1 CPU, 8 simulated devices, a GPU host or a pod: only the mesh changes.
"""

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from trainer.config import MESH_AXES
from trainer.errors import UserError

Rules = Mapping[str, tuple[str, ...]]


def make_mesh(sizes: Mapping[str, int], devices: list[jax.Device] | None = None, dcn_data: int = 1) -> Mesh:
  """A mesh with axes MESH_AXES of the given sizes, laid out for the interconnect.

  With dcn_data > 1 the data axis spans that many slices (multi-slice TPU pods): each
  slice holds a contiguous 1/dcn_data of it, so only the data-parallel gradient sum
  crosses the slow data-centre network. Where the devices all report one slice (CPU and
  GPU processes), each process counts as a slice.
  """
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if dcn_data > 1:
    devices = jax.devices() if devices is None else devices
    per_slice = (sizes['data'] // dcn_data, *shape[1:])
    try:
      grid = mesh_utils.create_hybrid_device_mesh(
          per_slice, (dcn_data,) + (1,) * (len(shape) - 1), devices,
          process_is_granule=len({getattr(d, 'slice_index', 0) for d in devices}) == 1)
    except ValueError as e:
      raise UserError(f'mesh.dcn_data={dcn_data}: {e}') from None
    return Mesh(grid, MESH_AXES, axis_types=axis_types)
  if devices is None:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def parse_rules(table: Mapping[str, str]) -> Rules:
  """{'batch': 'data,fsdp', 'norm': ''} -> {'batch': ('data', 'fsdp'), 'norm': ()}."""
  return {logical: tuple(a for a in axes.split(',') if a) for logical, axes in table.items()}


def logical_to_spec(logical_axes: tuple[str | None, ...], rules: Rules) -> PartitionSpec:
  spec = []
  for name in logical_axes:
    if name is not None and name not in rules:
      raise UserError(f'no sharding rule for logical axis {name!r}; add sharding.{name} to the config')
    axes = rules.get(name, ()) if name else ()
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def tree_shardings(abstract_tree, logical_tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a tree of arrays whose logical axes are in `logical_tree`.

  Raises UserError when a dimension does not divide over the mesh axes it maps to,
  naming the array: a message at start-up, not an XLA error inside jit.
  """

  def one(path, leaf, logical):
    spec = logical_to_spec(logical, rules)
    for size, name, axes in zip(leaf.shape, logical, spec):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      shards = math.prod(mesh.shape[a] for a in axes)
      if size % shards:
        raise UserError(
            f'{_path_name(path)} has {name} of size {size}, which does not divide over '
            f'mesh axes {"*".join(axes)}={shards}; change the model size or sharding.{name}')
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, abstract_tree, logical_tree)


def _path_name(path) -> str:
  """('layers', 'wk_DxKxE', 'value') key path -> 'layers/wk_DxKxE'."""
  names = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
  return '/'.join(n for n in names if n != 'value')


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """[B, L] arrays: rows over the batch axes, the sequence whole."""
  return NamedSharding(mesh, logical_to_spec(('batch', None), rules))


def host_batch_to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
