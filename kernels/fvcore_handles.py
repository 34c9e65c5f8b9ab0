"""fvcore op handles for the kernels' custom ops, so a traced model counts them like the reference.

On the Triton path ``torch.jit.trace`` (which fvcore uses) records each kernel as one custom op
(``pnfs::weighted_sum``, ...); without a handle fvcore skips it and lists it as unsupported.
Register the handles with ``FlopCountAnalysis(model, inputs).set_op_handle(**FVCORE_HANDLES)``.

Two conventions (fvcore counts one multiply-add as one "flop"):

* ``FVCORE_HANDLES`` = ``fvcore_handles()``: the count fvcore gives the reference, so a summary
  is the same on either backend. The references are elementwise ops and reductions
  (``aten::mul``, ``aten::add``, ``aten::square``, ``aten::sum``, ``aten::argmax``), which fvcore
  does not count as multiply-adds: 0, like convolution-only MAC tables (and the paper's).
* ``fvcore_handles(elementwise=True)``: the multiply-adds the op actually performs,

  - weighted_sum     K * numel(out)                    (out = sum_k w_k * x_k)
  - squash_score     numel(vectors)                    (n^2 = sum_t v_t * v_t)
  - squash_mse_loss  numel(vectors) + numel(scores)    (n^2, then (score - target)^2)
  - argmax_decode    0 (comparisons only)
"""

import math
from collections.abc import Callable

import torch

Handle = Callable[[list, list], int]


def _numel(value: torch._C.Value) -> int:
    value_type = value.type()
    if not isinstance(value_type, torch._C.TensorType):
        raise ValueError(f"fvcore handle: {value.debugName()} is a {value_type}, not a tensor")
    sizes = value_type.sizes()
    if sizes is None:
        raise ValueError(f"fvcore handle: no static shape for {value.debugName()}")
    return math.prod(sizes)


def _weighted_sum_macs(inputs: list, outputs: list) -> int:
    # TorchScript: inputs[0] is the list of tensors (prim::ListConstruct)
    return len(list(inputs[0].node().inputs())) * _numel(outputs[0])


def _squash_macs(inputs: list, outputs: list) -> int:
    return _numel(inputs[0])


def _squash_mse_macs(inputs: list, outputs: list) -> int:
    return _numel(inputs[0]) + _numel(inputs[2])


def _argmax_scores_macs(inputs: list, outputs: list) -> int:
    return 0


def _elementwise_counts() -> dict[str, Handle]:
    return {
        "pnfs::weighted_sum": _weighted_sum_macs,
        "pnfs::squash_score": _squash_macs,
        "pnfs::squash_mse_loss": _squash_mse_macs,
        "pnfs::argmax_decode": _argmax_scores_macs,
    }


def _like_reference(inputs: list, outputs: list) -> int:
    """fvcore has no multiply-add rule for the reference's elementwise ops and reductions."""
    return 0


def fvcore_handles(elementwise: bool = False) -> dict[str, Handle]:
    """Op name -> fvcore handle; ``elementwise=True`` counts the ops' own multiply-adds."""
    counts = _elementwise_counts()
    if elementwise:
        return counts
    return dict.fromkeys(counts, _like_reference)


FVCORE_HANDLES: dict[str, Handle] = fvcore_handles()
