"""What olive-builder knows about each target device, in one table.

A recipe's ``target.device`` decides its execution provider, the precisions it may be
built at, the device Olive's system is given, the builder image that converts it, the
runtime image that serves it (if any), and the key its provider has in genai_config.json's
``provider_options``. Every stage reads those facts here.

Stdlib only: the check imports this inside builder images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DeviceName = Literal["cpu", "cuda", "dml", "webgpu"]


@dataclass(frozen=True)
class Device:
    name: str
    provider: str  # the onnxruntime execution provider, the only one a recipe may name for it
    # What onnxruntime-genai 0.14's model builder offers for `-e <device>` (bf16 is CUDA only,
    # fp16 needs a GPU provider), plus int8 on the CPU (its kernels are the CPU's).
    precisions: tuple[str, ...]
    # Olive's accelerator type. Olive's ModelBuilder pass takes the model builder's `-e` from the
    # execution provider and builds fp16 only for a GPU accelerator, so every GPU provider's
    # target is a "gpu" accelerator, whatever the host has.
    olive_device: str
    builder_flavour: str  # Dockerfile.<flavour> builds it
    # The runtime image that serves it; None: DirectML (Windows) and WebGPU have no server
    # image, their artifacts are the model files alone.
    runtime_flavour: str | None
    # The key naming this provider in genai_config.json's provider_options; None for the CPU,
    # which needs no entry.
    genai_key: str | None


# The model builder converts for DirectML and WebGPU on any machine and Linux has neither
# provider, so the CPU builder builds those (and cross-checks them on the CPU).
DEVICES: dict[str, Device] = {
    "cpu": Device("cpu", "CPUExecutionProvider", ("int4", "int8", "fp32"), "cpu", "cpu", "runtime-cpu", None),
    "cuda": Device("cuda", "CUDAExecutionProvider", ("int4", "fp16", "bf16", "fp32"), "gpu", "cuda", "runtime-cuda",
                   "cuda"),
    "dml": Device("dml", "DmlExecutionProvider", ("int4", "fp16", "fp32"), "gpu", "cpu", None, "dml"),
    "webgpu": Device("webgpu", "WebGpuExecutionProvider", ("int4", "fp16", "fp32"), "gpu", "cpu", None, "webgpu"),
}


def device(name: str) -> Device:
    """The device record for a recipe's ``target.device`` (validated by the recipe loader)."""
    return DEVICES[name]


def served(name: str) -> bool:
    """True when a runtime image serves this device's models."""
    return DEVICES[name].runtime_flavour is not None
