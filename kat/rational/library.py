"""One way to define a GR-KAN op: `GradOp`, used by `group_rational` and `layer_norm_rational`.

From a forward and a backward implementation, the forward's fake and the op's reference composition in plain
PyTorch, a `GradOp` builds the three forms one op needs, and `GradOp.__call__` picks one:
- exporting (torch.onnx.export with either exporter, torch.export): the reference composition, so the graph
  holds standard operators (P/Q by Horner, |b|) that ONNX runtimes run without our kernels;
- tracing for torch.compile: the torch.library ops `<name>_fwd` / `<name>_bwd` with an autograd registration
  (fullgraph, no graph breaks). Where Triton compiles the kernels they are torch.library.triton_ops: the compiler
  traces into them and launches our kernels from its own generated code (as opaque custom ops, default-mode
  torch.compile ran KAT-S at about half ViT-S's speed: docs/BENCHMARKS.md section 3). Under the Triton
  interpreter (CPU tests) they are opaque custom ops with the given fake;
- eager: an autograd.Function running the same implementations. An eager step is bound by host time, and the
  custom-op dispatch costs several times an autograd.Function's (docs/BENCHMARKS.md section 1).
Either way autocast leaves the op alone: it runs in the dtypes it is given.

Conventions: the op's last argument is the backend string ('triton' or 'torch', resolved beforehand). `forward`
returns the result, or (result, *extras) where the extras (e.g. LayerNorm statistics) are saved for backward and
not differentiable. `backward(grad, *tensor inputs, *extras, backend)` returns one gradient per tensor input
(positions `tensor_inputs`), anything for an absent (None) input. Both take `wrap=`: the launcher of the Triton
kernels (torch.library.wrap_triton inside a triton_op, kat.triton_utils.direct otherwise).
"""

import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from kat.triton_utils import HAS_TRITON, INTERPRETED, direct

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Whether torch.compile can trace into the ops: interpreted kernels (TRITON_INTERPRET=1) cannot run on the fake
# tensors that tracing uses.
TRACEABLE_KERNELS = HAS_TRITON and not INTERPRETED
WRAP = torch.library.wrap_triton if TRACEABLE_KERNELS else direct


def exporting() -> bool:
    """Whether torch.onnx.export is tracing (either exporter). Not torch.compiler.is_exporting: on torch 2.11
    it is True under torch.compile too, which then compiled the reference instead of our kernels."""
    return torch.onnx.is_in_onnx_export()


_SCHEMA_TYPES = {"Tensor": Tensor, "Tensor?": Tensor | None, "float": float, "str": str, "ScalarType": torch.dtype}


def _signature(schema: str) -> inspect.Signature:
    """The Python signature of a schema such as "(Tensor x, Tensor? bias, str backend) -> (Tensor, Tensor)".

    torch.library infers an op's schema from its function's annotated signature; our op bodies take *args, so
    they carry this one (`__signature__`): torch 2.11's triton_op takes no explicit schema.
    """
    arguments, returns = schema.split(" -> ")
    parameters = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_SCHEMA_TYPES[kind])
        for kind, name in (argument.split() for argument in arguments.strip("()").split(", "))
    ]
    outputs = returns.strip("()").split(", ")
    return_type = Tensor if returns == "Tensor" else tuple[(Tensor,) * len(outputs)]
    return inspect.Signature(parameters, return_annotation=return_type)


def _library_op(name: str, fn: Callable, schema: str, fake: Callable):
    def body(*args):
        return fn(*args)

    body.__signature__ = _signature(schema)
    if TRACEABLE_KERNELS:
        return torch.library.triton_op(name, body, mutates_args=())  # its fake is the body itself, traced
    op = torch.library.custom_op(name, body, mutates_args=())
    op.register_fake(fake)
    return op


class GradOp:
    """A differentiable GR-KAN op defined once (see the module docstring).

    name: 'kat::<op>'; forward_schema / backward_schema: the torch.library schemas of `<name>_fwd` and
    `<name>_bwd`; tensor_inputs: positions of the forward's (optional) tensor arguments, in the order backward
    returns their gradients; reference: the forward in plain differentiable PyTorch, run while exporting.
    """

    def __init__(
        self,
        name: str,
        *,
        forward: Callable,
        backward: Callable,
        forward_fake: Callable,
        reference: Callable,
        forward_schema: str,
        backward_schema: str,
        tensor_inputs: tuple[int, ...],
    ):
        self.forward, self.backward, self.reference = forward, backward, reference
        self.tensor_inputs = tensor_inputs
        self.fwd = _library_op(f"{name}_fwd", self._fwd_body, forward_schema, forward_fake)
        self.bwd = _library_op(f"{name}_bwd", self._bwd_body, backward_schema, self._bwd_fake)
        self.fwd.register_autograd(self._op_backward, setup_context=self._setup_context)
        self.eager = self._eager_function()

    def __call__(self, *args):
        """The op's result on already checked arguments (the last one the backend)."""
        if exporting():
            return self.reference(*args)
        if torch.compiler.is_compiling():
            out = self.fwd(*args)
            return out[0] if isinstance(out, tuple) else out
        return self.eager.apply(*args)

    # The library ops' bodies, fakes and autograd registration.

    def _fwd_body(self, *args):
        return self.forward(*args, wrap=WRAP)

    def _bwd_body(self, grad, *args):
        grads = self.backward(grad, *args, wrap=WRAP)
        # Ops cannot return None (nor alias an input): an absent input's gradient is an empty tensor.
        return tuple(args[0].new_empty(0) if args[k] is None else g for k, g in enumerate(grads))

    def _bwd_fake(self, grad, *args):
        tensors = args[: len(self.tensor_inputs)]
        return tuple(
            tensors[0].new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
            for t in tensors
        )

    def _setup_context(self, ctx, inputs, output):
        extras = output[1:] if isinstance(output, tuple) else ()
        ctx.save_for_backward(*(inputs[i] for i in self.tensor_inputs), *extras)  # inputs in their own dtypes
        ctx.mark_non_differentiable(*extras)
        ctx.set_materialize_grads(False)  # no zero tensors for the extras' (absent) gradients
        ctx.backend, ctx.n_inputs = inputs[-1], len(inputs)

    def _op_backward(self, ctx, grad, *_extras_grads):
        saved = ctx.saved_tensors
        return self.input_grads(ctx.n_inputs, saved, self.bwd(grad, *saved, ctx.backend))

    def input_grads(self, n_inputs: int, saved: tuple, grads: tuple) -> tuple:
        """Backward's gradients -> one per forward input: None for non-tensor and absent inputs."""
        out = [None] * n_inputs
        for k, i in enumerate(self.tensor_inputs):
            if saved[k] is not None:
                out[i] = grads[k]
        return tuple(out)

    def _eager_function(self) -> type[torch.autograd.Function]:
        op = self

        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                out = op.forward(*args)
                extras = ()
                if isinstance(out, tuple):
                    out, *extras = out
                ctx.save_for_backward(*(args[i] for i in op.tensor_inputs), *extras)
                ctx.backend, ctx.n_inputs = args[-1], len(args)
                return out

            @staticmethod
            def backward(ctx, grad):
                saved = ctx.saved_tensors
                return op.input_grads(ctx.n_inputs, saved, op.backward(grad, *saved, ctx.backend))

        return Eager


# Input checks shared by the ops: one clear error naming the argument and the fix.


def check_tensors(op_name: str, x, **named) -> None:
    """x and each named tensor (None: absent, allowed) are float tensors on x's device."""
    for name, t in {"x": x, **named}.items():
        if t is None and name != "x":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op_name}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{op_name}: {name} has dtype {t.dtype}; use float32, bfloat16, float16 or float64 "
                f"(e.g. {name}.float())"
            )
        if t.device != x.device:
            raise ValueError(
                f"{op_name}: tensors on different devices (x: {x.device}, {name}: {t.device}); move them to "
                "one device"
            )


def check_coefficients(op_name: str, x: Tensor, numerator: Tensor, denominator: Tensor) -> None:
    """numerator (Gn, 6) and denominator (Gd, 4) with Gn, Gd in {1, G}, and x [..., C], C >= 1 a multiple of G."""
    if numerator.dim() != 2 or numerator.shape[1] != 6:
        raise ValueError(f"{op_name}: numerator must have shape (Gn, 6), got {tuple(numerator.shape)}")
    if denominator.dim() != 2 or denominator.shape[1] != 4:
        raise ValueError(f"{op_name}: denominator must have shape (Gd, 4), got {tuple(denominator.shape)}")
    groups = max(numerator.shape[0], denominator.shape[0])
    for name, t in (("numerator", numerator), ("denominator", denominator)):
        if t.shape[0] not in (1, groups):
            raise ValueError(
                f"{op_name}: {name} has {t.shape[0]} rows but the groups are {groups}: each coefficient tensor "
                "must have 1 row (shared by all groups) or one row per group"
            )
    if x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] % groups != 0:
        channels = x.shape[-1] if x.dim() else None
        raise ValueError(
            f"{op_name}: x must be [..., C] with C divisible by the {groups} groups (C >= 1); got x of shape "
            f"{tuple(x.shape)} (C = {channels})"
        )


def check_channel_vector(op_name: str, x: Tensor, **named) -> None:
    """Each named tensor (None: absent) has shape (C,): one value per channel of x."""
    for name, t in named.items():
        if t is not None and tuple(t.shape) != (x.shape[-1],):
            raise ValueError(
                f"{op_name}: {name} must have shape (C,) = ({x.shape[-1]},), one value per channel of x, got "
                f"{tuple(t.shape)}"
            )
