"""Forward (capture): record what each parameterised layer saw and the gradient of its output.

Every parameterised leaf layer gets an instance-level ``forward`` that
1. lets a *read hook* act on the rows it is about to read (LazyDP catches those rows up here, so no
   forward -- training or evaluation -- ever observes a row with pending noise);
2. runs the layer's own forward with its parameters *detached*, so autograd never builds the
   parameter gradient (for a table that would be a dense rows x dim tensor per step);
3. during training, routes the output through a tap whose backward stores dL/d(output).

The optimizer step then computes exact per-example norms and clipped sums from the recorded inputs
and output gradients alone (one backward pass, "book-keeping"). The model object is the caller's own,
unchanged in type, state_dict keys and parameters; ``CaptureSet.remove()`` restores it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.parameter import is_lazy

from lazydp.buffer_guard import BufferGuard, version_of
from lazydp.capture_checks import CaptureChecks, user_hooks_text
from lazydp.clipping import clipper_for, parameterised_leaves
from lazydp.clipping._base import Call, LayerClipper, at_least_float32, trainable_direct_params
from lazydp.errors import ConfigError, InputError, UnsupportedLayerError
from lazydp.row_groups import RowGroups


class RowsRead(NamedTuple):
    """What a read hook did with the ids a table call is about to read."""

    groups: RowGroups  # the ids grouped by row (the clipper reuses the sort)
    block: Tensor | None  # groups.rows as the forward must see them, when not in the table yet


# Called with (ids, defer): defer=True allows the hook to leave the caught-up rows out of the
# table (the forward then reads them from RowsRead.block).
ReadHook = Callable[[Tensor, bool], RowsRead | None]


class _Tap(torch.autograd.Function):
    """Identity whose backward hands the output gradient to a sink (the recorded call)."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, anchor: Tensor, record: _Record) -> Tensor:  # type: ignore[override]
        ctx.record = record
        # An alias, not a view: a view made inside a custom Function may not be modified in
        # place, and users do (``h *= 2``, ``relu(inplace=True)``). The backward still gets
        # dL/d(output) as the layer produced it, before any in-place op after the tap.
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        rec: _Record = ctx.record
        if not _accumulates(rec.anchor):
            # torch.autograd.grad(loss, x) (an input's gradient: a saliency map, an adversarial
            # example) or backward(inputs=...) without the model: plain PyTorch leaves every
            # parameter's .grad alone there, and recording it counted the gradient twice with
            # the loss.backward() that follows (or trained on it without one).
            return (grad if ctx.needs_input_grad[0] else None), None, None
        if rec.stale is not None:  # a later forward, zero_grad or a step forgot this record
            lost, cause = rec.stale
            lost.append(cause)
        # A layer whose output is used twice in the graph gets two backward calls: they add up.
        rec.grad_output = grad if rec.grad_output is None else rec.grad_output + grad
        rec.backed[0] = True
        return (grad if ctx.needs_input_grad[0] else None), None, None


@dataclass
class _Record:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    batch_size: int
    grad_output: Tensor | None = None
    memo: dict[str, Any] = field(default_factory=dict)
    out: Tensor | None = None  # the root's output (dpsgd_r compares its second pass with it)
    # Set when the record is forgotten (CaptureSet.clear): (the capture's lost list, the
    # cause). A backward that still reaches it appends the cause there, and the step refuses a
    # gradient that would otherwise be dropped.
    stale: tuple[list[str], str] | None = None
    # Shared by the records of one pass (CaptureSet._backed): set by the first backward that
    # reaches any of them, so a later training forward can tell it would start accumulating.
    backed: list[bool] = field(default_factory=lambda: [False])
    late: bool = False  # made after a backward reached this pass (see CaptureSet._make_forward)
    # The version counter of each tensor argument right after the layer ran (see
    # CaptureSet.check_inputs_unchanged); -1: an inference tensor, which has none.
    versions: tuple[int, ...] = ()
    tensors: tuple[Tensor, ...] = ()  # the tensor arguments, in the order of ``versions``
    # The gradient accumulator of the capture's anchor (a leaf under every tap): a backward that
    # will not run it accumulates no .grad (see _accumulates).
    anchor: Any = None

    def seal(self) -> None:
        """Remember the arguments' versions: the clipper reads them at the step, not now."""
        self.tensors = tuple(
            a for a in (*self.args, *self.kwargs.values()) if isinstance(a, Tensor)
        )
        self.versions = tuple(version_of(a) for a in self.tensors)

    def unchanged(self) -> bool:
        return tuple(version_of(a) for a in self.tensors) == self.versions


@dataclass
class LayerCapture:
    """One parameterised leaf layer under capture."""

    name: str
    module: nn.Module
    clipper: LayerClipper
    records: list[_Record] = field(default_factory=list)
    read_hook: ReadHook | None = None
    is_table: bool = False
    # The layer's own parameters at make_private, frozen ones included (see unchanged).
    owned: dict[str, Any] = field(default_factory=dict)
    # The hooks on each trainable parameter once capture registered its own (see unchanged).
    hooks: dict[str, int] = field(default_factory=dict)

    def params(self) -> dict[str, nn.Parameter]:
        return trainable_direct_params(self.module)

    def unchanged(self) -> bool:
        """Whether the layer still holds the very parameters it held at make_private."""
        now = self.module._parameters
        return len(now) == len(self.owned) and all(now.get(n) is p for n, p in self.owned.items())

    def hooked(self) -> list[str]:
        """Its parameters that got a gradient hook since make_private (see capture_checks.user_hooks_text)."""
        now = self.module._parameters
        # The count first (read every step); which hooks only once it grew: another engine's
        # capture of the same Parameter adds its own (shared_tables.py), no user's.
        return [
            n
            for n, k in self.hooks.items()
            if _hook_count(now.get(n)) > k and _user_hook_count(now.get(n))
        ]

    def calls(self) -> list[Call]:
        """The recorded calls whose output reached the loss (others contribute nothing)."""
        return [
            # Half-precision output gradients are widened once here, for every clipper: their
            # norms and clipped sums are then float32 (clipping/_base.at_least_float32).
            Call(r.args, r.kwargs, at_least_float32(r.grad_output), r.memo)
            for r in self.records
            if r.grad_output is not None
        ]


class CaptureSet(CaptureChecks):
    """All captured layers of one model, plus the root-level capture ``dpsgd_r`` needs."""

    def __init__(self, model: nn.Module, *, capture_root: bool = False) -> None:
        self.model = model
        self.layers: list[LayerCapture] = []
        self._anchor = torch.zeros((), requires_grad=True)
        # Held here, so the anchor keeps this one accumulator (torch holds it weakly).
        self._anchor_node = get_gradient_edge(self._anchor).node
        self._passthrough = False
        self._handles: list[Any] = []
        self.root_args: tuple[Any, ...] = ()
        self.root_kwargs: dict[str, Any] = {}
        self.root_record: _Record | None = None
        # The RNG state before the root forward (dpsgd_r's second pass replays it).
        self.root_rng: RngState | None = None
        self.outside_uses: set[str] = set()  # parameters autograd reached outside their layer
        # The causes (see clear) of forgotten records a backward still reached. One list for
        # the capture's life, emptied only when zero_grad drops the gradients: a stale
        # backward before the next forward must still be refused at the next step.
        self.lost: list[str] = []
        self._backed = [False]  # a backward reached this pass's records (see _Record.backed)
        _refuse_script_modules(model)
        leaves = parameterised_leaves(model)
        # Every refusal before any layer is touched: a model refused half-way would keep some
        # captured forwards (and then look captured by another engine).
        for name, module in leaves:
            if isinstance(module.__dict__.get("forward"), _CapturedForward):
                raise ConfigError(
                    f"layer {name or type(module).__name__!r} is already captured by another "
                    "PrivacyEngine (make_private was called on this model before). Call the "
                    "first engine's detach() -- it applies pending LazyDP noise and gives the "
                    "model back -- before making it private again; two engines on one model "
                    "would each miss the other's noise."
                )
            _refuse_param_hooks(name or type(module).__name__, module)
            lazy = [n for n, p in trainable_direct_params(module).items() if is_lazy(p)]
            if lazy:
                # Hooks cannot be registered on them (torch raises half-way through capture).
                raise ConfigError(
                    f"layer {name or type(module).__name__!r} ({type(module).__name__}) has "
                    f"uninitialized parameters {lazy} (a lazy module: their shapes are set by "
                    "its first forward). Run the model once on a batch of the right shape "
                    "before make_private, e.g. with torch.no_grad(): model(example_batch); "
                    "the optimizer built before keeps working."
                )
            if "forward" in module.__dict__:
                # Capturing runs the class's forward (the clippers' formulas are its
                # derivatives), and detach() removes the instance attribute: the assigned
                # forward would stop running, silently, and be gone afterwards.
                raise UnsupportedLayerError(
                    f"layer {name or type(module).__name__!r} ({type(module).__name__}) has a "
                    "forward assigned on the instance (module.forward = ..., by your code or by "
                    "a library's hooks, e.g. types.MethodType wrappers), which lazydp "
                    "would replace by the class's forward: the model would compute something "
                    "else without a word. Put the changed computation in a subclass's forward "
                    "(it is then clipped exactly by the torch.func fallback) or in a wrapper "
                    "module around the layer, and remove the instance attribute "
                    "(del module.forward)."
                )
        clippers = [clipper_for(module) for _, module in leaves]  # raises: no exact norm
        try:
            for (name, module), clipper in zip(leaves, clippers):
                layer = LayerCapture(
                    name=name or type(module).__name__,
                    module=module,
                    clipper=clipper,
                    is_table=_is_table(module, clipper),
                    owned=dict(module._parameters),
                )
                self.layers.append(layer)
                module.forward = _CapturedForward(self._make_forward(layer))  # type: ignore[method-assign]
                for pname, p in layer.params().items():
                    hook = self._outside_use(f"{layer.name}.{pname}")
                    self._handles.append(p.register_hook(hook))
                    layer.hooks[pname] = _hook_count(p)
            self.capture_root = capture_root
            self.buffers = BufferGuard(model)
            self._handles.append(
                model.register_forward_pre_hook(self._on_root_pre, with_kwargs=True)
            )
            if capture_root:
                self._handles.append(model.register_forward_hook(self._on_root_post))
        except BaseException:
            # Whatever failed after the checks above, the model is given back whole: a layer
            # left captured would refuse every later make_private as "already captured".
            self.remove()
            raise

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:  # reached through the root's hook
        raise copy_refused()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise copy_refused()

    # ------------------------------------------------------------------ forward
    def _outside_use(self, name: str) -> Callable[[Tensor], None]:
        """A hook on a captured parameter. Its layer runs with the parameter detached, so a
        gradient reaching the parameter itself comes from a use outside the layer (a tied output
        projection ``h @ emb.weight.T``, a penalty on the weights in the loss): a part of the
        gradient the clipper never sees. Recorded here, refused by ``check_no_outside_use``."""

        def hook(grad: Tensor) -> None:
            if not self._passthrough:  # dpsgd_r's second pass runs through the parameters
                self.outside_uses.add(name)

        return _OwnHook(hook)

    def _make_forward(self, layer: LayerCapture) -> Callable[..., Tensor]:
        module = layer.module
        cls_forward = type(module).forward

        def forward(*args: Any, **kwargs: Any) -> Tensor:
            if self._passthrough:  # dpsgd_r's second pass: plain autograd through the parameters
                return cls_forward(module, *args, **kwargs)
            if _compiling():
                raise UnsupportedLayerError(_compiled(f"layer {layer.name!r}"))
            # A training call after a backward the step has not used yet. Fine if nothing
            # backpropagates through it (a logged norm); accumulation if something does, also
            # where the loss does not come from model(...) (a compute_loss method calling the
            # layers), which the root's pre-hook never sees: check_no_late_gradient refuses it.
            # Calls made inside a backward (activation checkpointing's recompute) are not late.
            late = self._backed[0] and torch._C._current_graph_task_id() == -1
            memo: dict[str, Any] = {}
            read = None
            if layer.is_table:
                try:
                    rows = layer.clipper.rows_read(module, args, kwargs, memo)  # validates ids
                except InputError as exc:
                    raise InputError(f"layer {layer.name!r}: {exc}") from None
                if layer.read_hook is not None and rows is not None:
                    defer = torch.is_grad_enabled() and layer.clipper.reads_block(
                        module, args, kwargs, memo
                    )
                    read = layer.read_hook(rows, defer)
                    if read is not None:  # the hook grouped these ids: the clipper reuses it
                        memo["row_groups"] = read.groups
                        if defer and read.block is None and read.groups.rows.numel() == 0:
                            # No row read (every id padding, or no id): an empty block, not the
                            # table, which autograd would save (per_sample_weights requiring
                            # grad) and a catch-up or flush before the backward (an evaluation,
                            # state_dict(), engine.flush()) writes: torch then refuses the
                            # backward that dpsgd_f runs.
                            weight = module.weight
                            assert isinstance(weight, Tensor)
                            empty = weight.new_empty((0, int(weight.shape[1])))
                            read = read._replace(block=empty)
            if read is not None and read.block is not None:
                out = layer.clipper.forward_from_block(
                    module, args, kwargs, read.block, read.groups.positions(), memo
                )
            else:
                with _detached_params(module):
                    out = cls_forward(module, *args, **kwargs)
            if not torch.is_grad_enabled():
                return out
            if not isinstance(out, Tensor):
                raise UnsupportedLayerError(
                    f"layer {layer.name!r} ({type(module).__name__}) returns "
                    f"{type(out).__name__}, not a Tensor; lazydp clips per example through "
                    "layers that return one tensor, and a wrapper does not help (the layer "
                    "owning the parameters is what is captured). Use a layer that returns one "
                    "tensor: for a recurrent layer, step nn.GRUCell or nn.RNNCell over the "
                    "sequence in your forward."
                )
            batch = out.shape[0] if out.dim() > 0 else 1
            record = _Record(
                args,
                kwargs,
                batch,
                memo=memo,
                backed=self._backed,
                late=late,
                anchor=self._anchor_node,
            )
            record.seal()
            layer.records.append(record)
            return _Tap.apply(out, self._anchor, record)

        return forward

    def _on_root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled() or self._passthrough:
            return
        if self._backed[0]:
            # Forgetting them (as below) would train on the last micro-batch only, silently.
            self._refuse_accumulation()
        # A new training forward is a new batch: forget what a forward without a backward recorded.
        self.clear()
        self.mark_buffers()
        self.root_args, self.root_kwargs = args, kwargs
        if self.capture_root:
            self.root_rng = rng_state()

    def _on_root_post(self, module: nn.Module, args: tuple, out: Any) -> Any:
        if not torch.is_grad_enabled() or self._passthrough:
            return None
        if not isinstance(out, Tensor):
            # dpsgd_r backpropagates the reweighted gradient of this one output; without it the
            # step would train nothing (and still be charged).
            raise UnsupportedLayerError(
                f"mode='dpsgd_r' re-runs the model and backpropagates a reweighted gradient of "
                f"its output, so the model must return one Tensor; it returned "
                f"{type(out).__name__}. Return the tensor the loss is computed from, or use "
                "mode='dpsgd_b' or 'dpsgd_f' (they clip whatever the model returns)."
            )
        if out.dim() == 0:
            raise UnsupportedLayerError(
                "mode='dpsgd_r' reweights each example's output, so the model must return the "
                "batch in dimension 0; it returned a scalar. Return per-example outputs and "
                "reduce them in the loss, or use mode='dpsgd_b' or 'dpsgd_f'."
            )
        # A copy: the caller may change the returned tensor in place (out.sigmoid_()).
        record = _Record(
            args,
            {},
            out.shape[0],
            out=out.detach().clone(),
            backed=self._backed,
            anchor=self._anchor_node,
        )
        self.root_record = record
        return _Tap.apply(out, self._anchor, record)

    # ------------------------------------------------------------------ step side
    def batch_size(self) -> int:
        """The realised batch size of the recorded forward (all layers must agree)."""
        sizes = {r.batch_size for layer in self.layers for r in layer.records}
        if len(sizes) > 1:
            raise InputError(
                f"layers saw different batch sizes {sorted(sizes)} in one forward; lazydp needs "
                "dimension 0 of every layer output to be the batch (batch_first=True)."
            )
        return sizes.pop() if sizes else 0

    def has_records(self) -> bool:
        """Whether a training forward ran since the last step (or clear)."""
        return any(layer.records for layer in self.layers)

    def mark_buffers(self) -> None:
        self.buffers.mark()

    def check_buffers_unchanged(self) -> None:
        self.buffers.check()

    def has_backward(self) -> bool:
        """Whether a backward reached this pass (or a forgotten one) since the last step."""
        return self._backed[0] or bool(self.lost)

    def drop_backward(self) -> None:
        """Forget this pass if a backward reached it (or a forgotten one); keep a forward whose
        backward is still to come."""
        if self.has_backward():
            self.clear("zero_grad")

    def clear(self, by: str = "forward") -> None:
        """Forget the recorded pass; ``by`` (a new training forward, zero_grad or a step) names
        the cause if a backward still reaches it (check_no_lost_gradient)."""
        if by == "zero_grad":
            self.lost.clear()  # in place: records forgotten earlier append to this list too
        self._backed = [False]  # records of the pass just forgotten keep the old flag
        for layer in self.layers:
            for r in layer.records:
                r.stale = (self.lost, by)
            layer.records.clear()
        if self.root_record is not None:
            self.root_record.stale = (self.lost, by)
        self.root_record = None
        self.root_rng = None
        self.outside_uses.clear()

    @contextmanager
    def passthrough(self) -> Iterator[None]:
        self._passthrough = True
        try:
            yield
        finally:
            self._passthrough = False

    def remove(self) -> None:
        """Give the model back exactly as it was (class forwards, no hooks)."""
        for layer in self.layers:
            layer.module.__dict__.pop("forward", None)
        for h in self._handles:
            h.remove()
        self._handles.clear()


# torch's generator states and the autocast settings of each device type (see rng_state).
RngState = tuple[Tensor, list[Tensor], tuple[tuple[str, bool, torch.dtype], ...]]
_AUTOCAST_DEVICES = ("cpu", "cuda")


def rng_state() -> RngState:
    """torch's CPU generator state, once CUDA is in use every device's, and the autocast
    settings (mixed precision) the forward ran under."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    autocast = tuple(
        (d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES
    )
    return torch.get_rng_state(), cuda, autocast


@contextmanager
def replayed_rng(state: RngState) -> Iterator[None]:
    """Run a block with the RNG as it was at ``state`` (dropout masks, random augmentations draw
    again what they drew then) and under the same autocast settings (a forward replayed in full
    precision would give another output), and give the caller's RNG back untouched afterwards."""
    cpu, cuda, autocast = state
    with torch.random.fork_rng(devices=range(len(cuda))), ExitStack() as stack:
        torch.set_rng_state(cpu)
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
        for device, enabled, dtype in autocast:
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield


def _accumulates(anchor: Any) -> bool:
    """Whether the running backward accumulates into leaves' .grad: ``loss.backward()`` runs
    the anchor's accumulator (the anchor is a leaf under every tap), ``torch.autograd.grad``
    and ``backward(inputs=...)`` run only the accumulators of the inputs they name."""
    if anchor is None or _WILL_EXECUTE is None:  # (a torch without it: every backward)
        return True
    return bool(_WILL_EXECUTE(anchor))


_WILL_EXECUTE = getattr(torch._C, "_will_engine_execute_node", None)


class _CapturedForward:
    """A captured layer's instance-level forward. It refuses to be deep-copied or pickled: a
    copy would still run the original layer (the closure holds it), and the engine behind it
    (noise streams, ledger, pending LazyDP noise) is not something to duplicate."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self._fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        raise copy_refused()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise copy_refused()


def copy_refused() -> ConfigError:
    return ConfigError(
        "a model made private by a PrivacyEngine cannot be deep-copied or pickled whole "
        "(copy.deepcopy, torch.save(model), AveragedModel): its layers are bound to the engine, "
        "so a copy would run the original's weights, and LazyDP tables may owe noise. Copy the "
        "weights instead: new = Model(); new.load_state_dict(model.state_dict()) -- state_dict "
        "applies pending noise first -- or use engine.export(path) / engine.detach()."
    )


class _OwnHook:
    """A capture's own hook on a captured parameter (see CaptureSet._outside_use). Not counted
    by _user_hook_count: another engine's capture of the same Parameter (the benchmark's round
    robin on shared tables, shared_tables.py) is no user's gradient hook."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Tensor], None]) -> None:
        self.fn = fn

    def __call__(self, grad: Tensor) -> None:
        self.fn(grad)


def _hook_count(p: Tensor | None) -> int:
    """Gradient hooks on a parameter: register_hook's and register_post_accumulate_grad_hook's."""
    if p is None:
        return 0
    pre, post = p._backward_hooks, getattr(p, "_post_accumulate_grad_hooks", None)
    return len(pre or ()) + len(post or ())


def _user_hook_count(p: Tensor | None) -> int:
    """_hook_count less lazydp's own hooks (_OwnHook), whichever engine registered them."""
    pre = None if p is None else p._backward_hooks
    return _hook_count(p) - sum(isinstance(h, _OwnHook) for h in (pre or {}).values())


def _refuse_param_hooks(layer: str, module: nn.Module) -> None:
    """ConfigError for trainable parameters with gradient hooks (see capture_checks.user_hooks_text): a gradient
    mask for partial fine-tuning was ignored without a word."""
    hooked = [n for n, p in trainable_direct_params(module).items() if _user_hook_count(p)]
    if hooked:
        raise ConfigError(user_hooks_text(layer, hooked))


def _compiling() -> bool:
    """Whether torch.compile (dynamo) or torch.jit.trace is tracing this call."""
    return bool(_DYNAMO_COMPILING is not None and _DYNAMO_COMPILING()) or torch.jit.is_tracing()


_DYNAMO_COMPILING = getattr(getattr(torch, "compiler", None), "is_compiling", None)
_NOTHING = "Nothing was changed or charged."


def _compiled(what: str, when: str = "is being", then: str = _NOTHING) -> str:
    return (
        f"{what} {when} compiled (torch.compile or torch.jit.trace): the compiled graph would "
        "not run the per-layer recording lazydp clips each example from, so training through "
        "it is not supported. Train the eager model; compile or trace a copy for serving after "
        f"training (engine.detach() gives the model back). {then}"
    )


def _refuse_script_modules(model: nn.Module) -> None:
    """UnsupportedLayerError for TorchScript (torch.jit.script / trace): its compiled forward
    never calls the Python layers lazydp captures, so a traced model failed with a TypeError
    from torch's BufferDict and a scripted one was called a forward assigned on an instance.
    Also for a torch.compile'd module with a trainable parameter (its layers would be captured
    and traced); one without (a frozen backbone, an activation) trains as it did: nothing of
    it is captured, as a frozen parametrized backbone."""
    for name, module in model.named_modules():
        if (
            type(module).__name__ == "OptimizedModule"
            and hasattr(module, "_orig_mod")
            and any(p.requires_grad for p in module.parameters())
        ):
            what = f"layer {name!r}" if name else "the model"
            raise UnsupportedLayerError(
                _compiled(what, "was", "Pass it to make_private uncompiled.")
            )
        if isinstance(module, torch.jit.ScriptModule):
            raise UnsupportedLayerError(
                f"{'layer ' + repr(name) if name else 'the model'} is a TorchScript module "
                f"({type(module).__name__}, from torch.jit.script or torch.jit.trace): its "
                "compiled forward does not run the Python layers whose inputs and output "
                "gradients lazydp records, so no example could be clipped. Pass the eager "
                "model to make_private; script or trace a copy for serving after training "
                "(engine.detach(), or load model.state_dict() into a fresh model)."
            )


def _is_table(module: nn.Module, clipper: LayerClipper) -> bool:
    """An embedding table whose clipper can say which rows a call reads (the row-sparse paths,
    LazyDP's catch-up). A subclass with its own forward goes to the fallback clipper, which
    cannot: its weight is then noised and updated densely like any other parameter."""
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and (
        type(clipper).rows_read is not LayerClipper.rows_read
    )


@contextmanager
def _detached_params(module: nn.Module) -> Iterator[None]:
    """Run the layer with its own parameters detached (same storage, no autograd edge)."""
    saved = dict(module._parameters)
    try:
        for name, p in saved.items():
            if p is not None and p.requires_grad:
                module._parameters[name] = p.detach()  # type: ignore[assignment]
        yield
    finally:
        module._parameters.update(saved)
