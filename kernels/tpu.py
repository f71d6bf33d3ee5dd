"""The VMEM a TPU generation gives a kernel, from jax's own table (pltpu.get_tpu_info_for_chip).

The loss kernels size their blocks to it. A device is named by its `device_kind`, as
real and compile-only topology devices report it.
"""

from jax.experimental.pallas import tpu as pltpu

CHIPS = {
    'TPU v4': pltpu.ChipVersion.TPU_V4,
    'TPU v5 lite': pltpu.ChipVersion.TPU_V5E,
    'TPU v5e': pltpu.ChipVersion.TPU_V5E,
    'TPU v5': pltpu.ChipVersion.TPU_V5P,
    'TPU v5p': pltpu.ChipVersion.TPU_V5P,
    'TPU v6 lite': pltpu.ChipVersion.TPU_V6E,
    'TPU v6e': pltpu.ChipVersion.TPU_V6E,
}
MiB = 2 ** 20


def vmem_limit(device_kind: str) -> int | None:
  """Scoped VMEM bytes a kernel may ask for on this generation (None: not a known TPU).

  Mosaic's default scope is 16 MiB; where a core has more (64 MiB on v5p, 128 MiB on
  v5e and v6e) the kernels ask for three quarters of it and leave the rest to the
  compiler. A v4 core has 16 MiB in all.
  """
  chip = CHIPS.get(device_kind)
  if chip is None:
    return None
  # Per TensorCore: a megacore device's kernel runs on one core's VMEM.
  return max(16 * MiB, pltpu.get_tpu_info_for_chip(chip, 1).vmem_capacity_bytes * 3 // 4)
