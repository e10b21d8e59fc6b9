"""What the numbers were measured on: CPU model, the instruction-set flags that matter here, versions,
and the memory available right now."""

from __future__ import annotations

import platform
from importlib import metadata

NOTABLE_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_bf16",
    "amx_int8",
    "avx_vnni",
)
PACKAGES = ("onnxruntime", "onnx", "numpy", "torch", "diffusers", "transformers", "openvino")


def _cpuinfo() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    key, value = (s.strip() for s in line.split(":", 1))
                    info.setdefault(key, value)
    except OSError:
        pass
    return info


def describe() -> dict:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name", platform.processor()),
        "logical_cpus": __import__("os").cpu_count(),
        "flags": [f for f in NOTABLE_FLAGS if f in flags],
        "memory_mb": round(total_mb()),
        "python": platform.python_version(),
    }


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _meminfo(key: str) -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def available_mb() -> float:
    return _meminfo("MemAvailable")


def total_mb() -> float:
    return _meminfo("MemTotal")
