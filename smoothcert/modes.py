"""Numeric modes: the exact function a certificate is about (torch-free, so the API can
validate a request's mode without loading torch).

A mode is a compute dtype and optional execution flags, named canonically, e.g. `fp32`,
`bf16+channels_last`, `bf16+fuse+channels_last`, `fp16+cuda_graphs`. Every part of the name
can change the floating point result of the network, so the whole name goes into the
certificate and the memory namespace: certificates made in different modes never share a
memory.

- `fp32` (default): the network as stored, in IEEE float32 (on CUDA too: TF32 is switched
  off, smoothcert.numerics.pin_ieee_fp32).
- `bf16`: `torch.autocast` to bfloat16 (CPU with AVX-512 BF16 / AMX, or CUDA).
- `fp16`: `torch.autocast` to float16, CUDA only.
- `+fuse`: BatchNorm folded into the preceding convolution for inference (changes rounding,
  so it is part of the name). The network is traced with torch.fx (a network it cannot trace
  is refused); one with nothing to fold runs unchanged. CPU and CUDA.
- `+channels_last`: NHWC memory format for 4-d inputs (faster convolutions on oneDNN/cuDNN).
- `+compile`: `torch.compile`, compiled once per worker when the model is loaded.
- `+cuda_graphs`: `torch.compile(mode="reduce-overhead")`, which replays CUDA graphs; CUDA only.
"""

from __future__ import annotations

from dataclasses import dataclass

from smoothcert.bounds import InvalidParameters

DTYPES = ("fp32", "bf16", "fp16")
# Canonical order in a name, which is also the order they are applied in: fold BatchNorm,
# then change the memory format, then compile.
FLAGS = ("fuse", "channels_last", "compile", "cuda_graphs")
CUDA_ONLY = ("fp16", "cuda_graphs")
DEFAULT = "fp32"


@dataclass(frozen=True)
class NumericMode:
    """A parsed numeric mode; `name` is canonical (dtype first, flags in FLAGS order)."""

    dtype: str = DEFAULT
    fuse: bool = False
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False

    @property
    def name(self) -> str:
        return "+".join([self.dtype, *(f for f in FLAGS if getattr(self, f))])

    @property
    def compiled(self) -> bool:
        return self.compile or self.cuda_graphs

    def needs_cuda(self) -> list[str]:
        """The parts of this mode that only run on a CUDA device."""
        return [p for p in (self.dtype, *(f for f in FLAGS if getattr(self, f))) if p in CUDA_ONLY]

    def check_device(self, device_type: str) -> None:
        """Refuse a mode the device cannot run (InvalidParameters names the parts)."""
        if device_type != "cuda" and (parts := self.needs_cuda()):
            raise InvalidParameters(
                f"numeric mode {self.name!r} needs a CUDA device ({', '.join(parts)}); "
                f"this worker runs on {device_type}"
            )


def parse_mode(name: str | NumericMode | None) -> NumericMode:
    """The mode named `name` ("bf16+channels_last", flags in any order); None is fp32, and
    a NumericMode is itself."""
    if isinstance(name, NumericMode):
        return name
    if name is None:
        return NumericMode()
    if not isinstance(name, str) or not name:
        raise InvalidParameters("numeric_mode must be a non-empty string such as 'fp32' or 'bf16+channels_last'")
    dtype, *flags = name.split("+")
    if dtype not in DTYPES:
        raise InvalidParameters(f"numeric_mode {name!r}: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    unknown = [f for f in flags if f not in FLAGS]
    if unknown:
        raise InvalidParameters(f"numeric_mode {name!r}: unknown flag(s) {unknown}; flags are {', '.join(FLAGS)}")
    if len(set(flags)) != len(flags):
        raise InvalidParameters(f"numeric_mode {name!r} repeats a flag")
    if "compile" in flags and "cuda_graphs" in flags:
        raise InvalidParameters("cuda_graphs already compiles the network: give compile or cuda_graphs, not both")
    return NumericMode(dtype, **{f: f in flags for f in FLAGS})


def canonical_mode(name: str | None) -> str:
    """The canonical name of a mode (validates it)."""
    return parse_mode(name).name
