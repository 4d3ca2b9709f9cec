"""Buffers a training step must not write: the guard behind ``CaptureSet.check_buffers_unchanged``.

Why: a buffer computed from the batch (a custom layer's running mean, an EMA, a count of the
examples seen) is released in ``state_dict()`` and steers every evaluation forward with neither
clipping nor noise, and no parameter gradient shows it. BatchNorm's and InstanceNorm's running
statistics are refused up front (clipping/registry.py); this catches any other layer's.

Contract: ``mark()`` remembers every buffer slot of the model (the tensor, its version counter
and, up to ``_COPY_MAX`` elements, a copy of its values) as the training forward starts and
after each step; ``check()`` raises ConfigError, before anything is charged, if a slot now holds
another tensor, one with another version, other values (NaNs where they were count as equal),
or is new. Slots, not tensors: an EMA is often reassigned. The copy catches writes that leave
the version as it was (through ``.data`` or numpy, or some of torch's own ops: QAT's fused
moving-average observer). Buffers above ``_COPY_MAX`` are compared by tensor and version only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from lazydp.errors import ConfigError

# A buffer as mark() saw it: the tensor, its version and a copy of its values (_LAZY for
# an uninitialized buffer, which has none).
_BufferState = tuple[Tensor | None, int, Tensor | str | None]
_NO_BUFFER: _BufferState = (None, -2, None)
_LAZY = "lazy"


#: Buffers above this many elements are compared by tensor and version only: statistics from
#: a batch are small (per channel, per feature), while a copy of a large constant (a mask, a
#: lookup table) at every step would cost more than the step.
_COPY_MAX = 1 << 22


def version_of(t: Tensor) -> int:
    """The tensor's version counter; -1 for an inference tensor, which has none."""
    return -1 if t.is_inference() else t._version


def _buffer_state(b: Tensor | None) -> _BufferState:
    if b is None:
        return _NO_BUFFER
    if is_lazy(b):
        return b, version_of(b), _LAZY
    return b, version_of(b), b.detach().clone() if b.numel() <= _COPY_MAX else None


def _buffer_unchanged(state: _BufferState, b: Tensor | None) -> bool:
    """Whether slot ``b`` holds the tensor ``state`` saw, unwritten and with the same values."""
    was, version, copy = state
    if b is not was:
        return False
    if b is None:
        return True
    if copy is _LAZY or is_lazy(b):  # materialising a lazy buffer keeps the object
        return copy is _LAZY and is_lazy(b)
    if version_of(b) != version:
        return False
    if copy is None:  # too large to copy (see _COPY_MAX)
        return b.numel() > _COPY_MAX
    assert isinstance(copy, Tensor)
    if (b.shape, b.dtype, b.device) != (copy.shape, copy.dtype, copy.device):
        return False
    if torch.equal(b, copy):
        return True
    # NaN != NaN: a buffer holding NaN is unchanged if its NaNs are where they were.
    return (b.is_floating_point() or b.is_complex()) and bool(
        ((b == copy) | (b.isnan() & copy.isnan())).all()
    )


class BufferGuard:
    """Every buffer of ``model`` as ``mark()`` saw it, for ``check()`` to compare with."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.mark()

    def _slots(self) -> dict[str, tuple[nn.Module, str]]:
        """Every buffer slot of the model, by name, listed again each time: a buffer
        registered, or a submodule holding one added, after make_private (an EMA created at
        its first forward) is no less the batch's."""
        return {
            f"{mname}.{name}" if mname else name: (m, name)
            for mname, m in self.model.named_modules()
            for name in m._buffers
        }

    def mark(self) -> None:
        self._seen = {
            label: _buffer_state(m._buffers[name]) for label, (m, name) in self._slots().items()
        }

    def check(self) -> None:
        now = self._slots()
        seen = self._seen
        changed = [
            label
            for label in dict.fromkeys([*seen, *now])
            if not _buffer_unchanged(
                seen.get(label, _NO_BUFFER),
                now[label][0]._buffers.get(now[label][1]) if label in now else None,
            )
        ]
        if changed:
            raise ConfigError(
                f"buffer(s) {changed} changed between the training forward and "
                "optimizer.step() (a layer updating running statistics or an average from the "
                "batch? a cache rebuilt for the batch's shape?). A buffer computed from training "
                "data is released in state_dict() and used by every evaluation with neither "
                "clipping nor noise, so DP-SGD does not cover it. Compute it outside training "
                "(from public data, or as a DP statistic), keep it constant while training "
                "(build a cache once for the longest input), or hold a counter that does not "
                "depend on the data in a Python attribute instead of a buffer; run evaluations "
                "between steps, not between backward and step(). Nothing was charged and no "
                "parameter changed, but the buffer may now hold values computed from the batch: "
                "do not release this model as is."
            )
