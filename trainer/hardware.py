"""What salt knows of the accelerators it runs on: peak FLOP/s and Cloud TPU generations."""

import dataclasses

import jax

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets. Matched against
# jax.Device.device_kind by prefix, longest first.
PEAK_FLOPS = {
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA B200': 2250e12,
    'NVIDIA A100': 312e12,
    'NVIDIA L4': 121e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
    'TPU7x': 2307e12,
}


def peak_flops(device: jax.Device) -> float | None:
  """Peak FLOP/s of one device, or None where unknown (CPUs)."""
  for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
    if device.device_kind.startswith(prefix):
      return PEAK_FLOPS[prefix]
  return None


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  topology: str  # libtpu's topology name prefix
  torus_dims: int
  cores_per_device: int  # v4 and v5p pair two cores as one device, and their type names count cores
  hbm_gib: int  # per device
  runtime_version: str  # the TPU VM image gcloud boots (--runtime-version)


# Cloud TPU generations by accelerator-type prefix, as gcloud names them.
TPU_GENERATIONS = {
    'v4': TpuGeneration('v4', 3, 2, 32, 'tpu-ubuntu2204-base'),
    'v5p': TpuGeneration('v5', 3, 2, 95, 'v2-alpha-tpuv5'),
    'v5litepod': TpuGeneration('v5e', 2, 1, 16, 'v2-alpha-tpuv5-lite'),
    'v6e': TpuGeneration('v6e', 2, 1, 32, 'v2-alpha-tpuv6e'),
}
# Names people use that gcloud does not, and gcloud's.
GCLOUD_NAMES = {'v5e': 'v5litepod', 'v6': 'v6e', 'v5': 'v5p'}


def tpu_devices(accelerator_type: str) -> int | None:
  """JAX devices in one slice of a type such as v5p-128; None for a type not in TPU_GENERATIONS."""
  generation, _, size = accelerator_type.partition('-')
  if generation not in TPU_GENERATIONS or not size.isdigit():
    return None
  return int(size) // TPU_GENERATIONS[generation].cores_per_device
