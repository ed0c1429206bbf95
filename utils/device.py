"""Choosing the compute device from ``--device``, and compiling the network for it."""
import shutil

import torch

from .errors import UserInputError


def parse_device(name):
    """``--device`` value -> torch.device, checking only the name (cpu, cuda or cuda:N), not whether
    this machine has it (an experiment file may be checked on a machine without its GPU).

    Raises: UserInputError for an unparsable name or another device type.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserInputError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserInputError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    return device


def resolve_device(name=None):
    """``--device`` value -> torch.device; None picks CUDA when available, else CPU.

    Raises: UserInputError for an unparsable name or a CUDA device this machine lacks.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {name}: no CUDA GPU is available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
"""Values of ``--compile``: off, or a ``torch.compile`` mode (reduce-overhead adds CUDA graphs)."""


def has_cxx_compiler():
    """Whether a C++ compiler (c++, g++ or clang++) is on PATH, as torch.compile needs on the CPU."""
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def compile_model(model, mode, device):
    """``torch.compile(model, mode=mode, dynamic=False)``, or ``model`` itself for mode "off".

    The compiled module shares parameters and buffers with ``model``, so checkpoints are still
    written from ``model`` (no ``_orig_mod.`` prefixes). Compilation happens at the first call
    (tens of seconds); the last, smaller batch of an epoch compiles once more.

    Raises: UserInputError if the toolchain for ``device`` is missing (a C++ compiler on the
    CPU, Triton on a GPU) or ``mode`` is not one of ``COMPILE_MODES``.
    """
    if mode not in COMPILE_MODES:
        raise UserInputError(f"--compile {mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if mode == "off":
        return model
    if device.type == "cpu" and not has_cxx_compiler():
        raise UserInputError(f"--compile {mode} on the CPU needs a C++ compiler (g++ or clang++) on PATH; "
                             "install one or use --compile off")
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise UserInputError(f"--compile {mode} on a GPU needs the triton package; "
                                 "install it or use --compile off") from None
    return torch.compile(model, mode=mode, dynamic=False)


AMP_CHOICES = ("auto", "on", "off")
"""Values of ``--amp``: auto (bf16 where the hardware has it), on (bf16 everywhere), off (fp32)."""


def cpu_capability():
    """The CPU's vector capability as torch reports it (``torch.backends.cpu.get_cpu_capability()``:
    ``AVX2``, ``AVX512``, ``DEFAULT``, ...), with ``+AMX`` / ``+AVX512_BF16`` appended when the CPU has
    those bf16 units (torch reports them apart). Returns: str, e.g. ``"AVX2"`` or ``"AVX512+AMX+AVX512_BF16"``."""
    parts = [torch.backends.cpu.get_cpu_capability()]
    if cpu_has_amx():
        parts.append("AMX")
    if cpu_has_avx512_bf16():
        parts.append("AVX512_BF16")
    return "+".join(parts)


def cpu_has_amx():
    """Whether torch reports AMX tile units on this CPU (native bf16 matrix multiply)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def cpu_has_avx512_bf16():
    """Whether torch reports the AVX512-BF16 instructions on this CPU."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


def cpu_has_native_bf16():
    """Whether this CPU computes bfloat16 natively (AMX or AVX512-BF16, as torch reports them).

    Elsewhere (AVX2-only CPUs: most cloud VMs and laptops, e.g. AMD EPYC Zen 3) torch emulates
    bf16 through fp32 conversions, several times slower than fp32 itself (DFHNet training: 3.9
    against 29 images/s on a loaded 2-core AMD EPYC, issue 21).
    """
    return cpu_has_amx() or cpu_has_avx512_bf16()


def gpu_has_native_bf16(device):
    """Whether the CUDA ``device`` computes bf16 natively: compute capability 8.0 or newer (Ampere,
    Hopper, ...; on older GPUs bf16 is emulated and slower than fp32). ROCm GPUs count as native,
    as in ``torch.cuda.is_bf16_supported`` (true from MI100 on, not of older ones).

    Args: device: torch.device of type ``cuda``.
    Returns: bool; True when this machine has no CUDA device to ask (a grid planned here for a GPU
    machine: its cells are taken to run where bf16 is native, as on the A100/H100/H200 class).
    """
    if torch.version.hip or not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_properties(device).major >= 8


def choose_precision(amp_flag, device, method_allows_amp=True):
    """The training precision for ``--amp`` on ``device``.

    ``auto``: bf16 autocast on GPUs and CPUs with native bf16 (``gpu_has_native_bf16``,
    ``cpu_has_native_bf16``), fp32 elsewhere; ``on``: bf16 wherever asked (on a device without
    native bf16 with a note that it is emulated and slow); ``off``: fp32. A method that does not support autocast
    (``method_allows_amp`` False) always gets fp32 (``--amp on`` is refused before this).

    Args: amp_flag: str, one of ``AMP_CHOICES``; device: torch.device.
    Returns: (amp: bool, precision: ``"bf16"`` or ``"fp32"``, note: str or None, the ``[note]`` line).
    Raises: ValueError for an ``amp_flag`` outside ``AMP_CHOICES``.
    """
    if amp_flag not in AMP_CHOICES:
        raise ValueError(f"--amp {amp_flag!r}: expected one of {', '.join(AMP_CHOICES)}")
    native = ((device.type == "cuda" and gpu_has_native_bf16(device))
              or (device.type == "cpu" and cpu_has_native_bf16()))
    amp = method_allows_amp and (amp_flag == "on" or (amp_flag == "auto" and native))
    note = None
    if amp and not native and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        note = (f"[note] --amp on: this GPU ({torch.cuda.get_device_name(device)}, compute capability "
                f"{major}.{minor}) has no native bf16 (it needs 8.0 or newer), so bf16 is emulated there and "
                "slower than fp32; --amp auto picks fp32 here")
    elif amp and not native:
        note = (f"[note] --amp on: this CPU has no native bf16 (torch reports capability "
                f"{cpu_capability()}, no AMX or AVX512-BF16), so bf16 is emulated there and several times "
                "slower than fp32 (about 7x for DFHNet on an AVX2 AMD EPYC); --amp auto picks fp32 here")
    return amp, ("bf16" if amp else "fp32"), note


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo`` "model name", else ``platform.processor()``), or "unknown"."""
    import platform
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device):
    """The machine a run uses, as a record names it (no host name, no path).

    Args: device: torch.device or a name (``"cpu"``, ``"cuda:0"``).
    Returns: dict with ``cpu_model`` (str, ``cpu_model()``), ``cpu_capability`` (str,
    ``cpu_capability()``, e.g. ``"AVX2"``) and ``gpu_name`` (str, ``torch.cuda.get_device_name``,
    for a CUDA device; None for the CPU).
    Raises: RuntimeError / AssertionError from torch for a CUDA device this machine lacks.
    """
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu_model": cpu_model(), "cpu_capability": cpu_capability(), "gpu_name": gpu}
