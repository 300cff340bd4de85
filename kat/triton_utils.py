"""Host-side helpers shared by every Triton kernel in kat: the GR-KAN ops (kat.rational) and the GPU
augmentation (kat.data.gpu). Importing this module never fails: kat runs where triton is not installed (the
PyTorch paths need none), and then `HAS_TRITON` is False.
"""

import contextlib
import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETER_PROGRAMS = 4  # stands in for the SM count under TRITON_INTERPRET=1 (exercises multi-program loops)

if HAS_TRITON:
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    @triton.jit
    def _probe():
        pass

    # TRITON_INTERPRET=1 (read by triton when a kernel is decorated): kernels run on CPU tensors in numpy.
    INTERPRETED = isinstance(_probe, InterpretedFunction)
else:
    INTERPRETED = False


def cdiv(a: int, b: int) -> int:
    """ceil(a / b). Not triton.cdiv: in recent Triton that is a jit-decorated function with a far higher host
    cost, and launchers call this on an eager step's critical path."""
    return (a + b - 1) // b


def device_guard(device: torch.device):
    """Launch on `device`: Triton launches on the current CUDA device, so kernels for cuda:1 need this guard
    (skipped when `device` is current: entering torch.cuda.device has a host cost on every call)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


_SM_COUNT: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (cached); a small stand-in for CPU tensors under the interpreter."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def check_device(x: torch.Tensor, op_name: str) -> None:
    """Errors for a device the Triton kernels cannot run on."""
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            f"{op_name} backend='triton' on a CPU tensor needs the Triton interpreter: set the environment "
            "variable TRITON_INTERPRET=1 before triton is first imported (e.g. before `import kat`), move x to "
            "a CUDA device, or use backend='torch'"
        )
    if x.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{op_name} backend='triton' does not support {x.device.type} tensors")


def direct(kernel):
    """The kernel itself: the launchers' default `wrap`. Inside a torch.library.triton_op they get
    torch.library.wrap_triton instead, which lets torch.compile see and launch the kernels itself."""
    return kernel
