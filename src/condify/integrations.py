"""condify in your own training loop: the methods' auxiliary losses and per-step maintenance.

``condify.calibrate`` trains with terms that are not in the LM loss: mod-threshold moves every router
bias after each step so each gated layer keeps ``capacity`` of the tokens; lte in its soft mode adds a
sparsity term whose weight ``eta`` follows the executed fraction, and in its hard modes holds the
threshold at the target. The same terms reach a loop of your own::

    condify.integrations.attach(model)          # once, before the first forward
    for batch in loader:
        loss = model(**batch).loss + condify.training_loss(model)
        loss.backward(); opt.step(); opt.zero_grad()
        condify.integrations.step(model)        # after every optimiser step

``model`` may be wrapped (DDP, FSDP, ``accelerate.prepare``, ``torch.compile``, PEFT). Under the HF
``Trainer``: :class:`CondifyTrainer` does all three; or pass ``callbacks=[CondifyCallback()]`` (attach +
step) and add ``condify.training_loss(model)`` in your ``compute_loss``. With several processes
(DDP/FSDP), :func:`step` averages what it measured over the ranks (every rank must call it), so every
replica moves its biases and thresholds alike. Methods without such terms (layer-parallel, dynamic-k,
mot) add a zero loss and a no-op step: any loop that trains a dense model trains them.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch
from torch import nn

from . import registry
from .adapters import get_adapter
from .config import ConfigError
from .convert import CONFIG_KEY, ModifyError, applied_configs

__all__ = [  # and, built on first access (importing the Trainer takes seconds): CondifyCallback, CondifyTrainer
    "Session",
    "attach",
    "attached",
    "converted_model",
    "detach",
    "fsdp_units",
    "fsdp_wrap_policy",
    "fully_shard",
    "step",
    "training_loss",
]

Options = dict[str, dict[str, Any]]


# ----------------------------------------------------------------------------------------------------------
# records the methods' sites fill during a forward (never copied with the model)
# ----------------------------------------------------------------------------------------------------------


def _none(*_: Any) -> None:
    return None


class Records(dict):
    """A site's per-forward record (e.g. ``RouterState.record``); a copy of the model records nothing."""

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return (_none, ())


class RecordList(list):
    """:class:`Records` as a list (e.g. lte's per-site scores)."""

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return (_none, ())


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend())
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6
    if acc is not None and acc.is_available():
        return torch.device(acc.current_accelerator().type, acc.current_device_index())
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_mean(values: list[float], weights: list[float]) -> tuple[list[float], list[float]]:
    """Weighted means of ``values`` over the data-parallel ranks and the total weights (one all-reduce;
    one process: ``values`` and ``weights`` as given). A value with weight 0 does not count."""
    if not _distributed():
        return list(values), list(weights)
    import torch.distributed as dist

    n = len(values)
    t = torch.tensor(
        [v * w if w else 0.0 for v, w in zip(values, weights, strict=True)] + list(weights),
        dtype=torch.float64,
        device=_collective_device(),
    )
    dist.all_reduce(t)
    sums, totals = t[:n].tolist(), t[n:].tolist()
    return [s / w if w else 0.0 for s, w in zip(sums, totals, strict=True)], totals


# ----------------------------------------------------------------------------------------------------------
# finding the converted model, the session
# ----------------------------------------------------------------------------------------------------------


def _inner(m: nn.Module) -> nn.Module | None:
    """The module a wrapper runs (DDP, DataParallel, FSDP1, torch.compile, PEFT), None for others."""
    if isinstance(m, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return m.module
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and isinstance(m, fsdp.FullyShardedDataParallel):
        return m.module
    if "_orig_mod" in m._modules:  # torch.compile's OptimizedModule
        return m._modules["_orig_mod"]
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(m, peft.PeftModel):
        return m.get_base_model()
    return None


def _unwrapped(model: Any) -> nn.Module | None:
    m = model
    for _ in range(16):
        if not isinstance(m, nn.Module):
            return None
        inner = _inner(m)
        if inner is None:
            return m
        m = inner
    return None


def converted_model(model: Any) -> nn.Module | None:
    """The condify-converted transformers model in ``model`` or inside its wrappers (DDP, FSDP,
    ``accelerate.prepare``, ``torch.compile``, PEFT); None if there is none."""
    m = _unwrapped(model)
    cfg = getattr(m, "config", None)
    return m if cfg is not None and getattr(cfg, CONFIG_KEY, None) else None


def _require(model: Any, what: str) -> nn.Module:
    m = converted_model(model)
    if m is None:
        raise ModifyError(
            f"{what}: expected a model converted by condify (or a DDP/FSDP/PEFT/compiled wrapper of one), got "
            f"{type(model).__name__} without config.condify; call condify.modify(model, method=...) first"
        )
    return m


class Session:
    """What :func:`attach` armed on one converted model: each method's training hooks (by method name)
    and the options they were made with. Kept on the model as ``_condify_training``; a copy of the model
    (``copy.deepcopy``, pickling) does not carry it. A context manager: leaving it detaches."""

    def __init__(self, model: nn.Module, hooks: dict[str, registry.TrainingHooks], options: Options) -> None:
        self.model = weakref.ref(model)
        self.hooks, self.options = hooks, options
        self.handle: Any = None

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return (_none, ())

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        model = self.model()
        if model is not None:
            detach(model)


class _ForwardStart:
    """Forward pre-hook on the decoder stack: a new forward drops the records of the last one. A copy of
    the model carries a copy of the hook, which does nothing there (its model is not the copy)."""

    def __init__(self, owner: nn.Module, session: Session) -> None:
        self.owner, self.session = weakref.ref(owner), weakref.ref(session)

    def __call__(self, module: nn.Module, args: Any) -> None:
        session = self.session()
        if session is not None and module is self.owner():
            for h in session.hooks.values():
                h.begin_forward()


def _owner(model: nn.Module) -> nn.Module:
    """The module that owns the decoder-layer list (called once per forward, also under PEFT)."""
    parent = get_adapter(model).layers.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


def attached(model: Any) -> Session | None:
    """The :class:`Session` armed on ``model`` (or the converted model inside it), None if none."""
    m = converted_model(model)
    return None if m is None else getattr(m, "_condify_training", None)


def _validated(m: nn.Module, options: Options) -> dict[str, Any]:
    """Every applied method's calibrate options for its hooks (checked before anything changes)."""
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ConfigError(
            f"attach: `options` must map a method name to a dict of its options, e.g. "
            f"{{'mod-threshold': {{'bias_momentum': 0.8}}}}, got {options!r:.200}"
        )
    methods = [c.method for c in applied_configs(m)]
    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise ConfigError(
            f"attach: options for {unknown}, which are not applied to this model; applied: {methods}"
        )
    out = {}
    for name in methods:
        spec, opts = registry.get(name), options.get(name, {})
        allowed = spec.training_options if spec.training is not None else ()
        bad = sorted(set(opts) - set(allowed))
        if bad:
            raise ConfigError(
                f"attach: {name} takes no training option {bad}; "
                + (
                    f"its training options are {list(allowed)}"
                    if allowed
                    else "it has no per-step training terms"
                )
            )
        if spec.training is not None:
            out[name] = spec.options.from_options(**opts)
    return out


def attach(model: Any, options: Options | None = None) -> Session:
    """Arm the training hooks of every method applied to ``model`` (the converted model inside any
    wrapper) and return the :class:`Session`; call it once before the first training forward.

    ``options``: per method, the calibrate options its hooks read (defaults: calibrate's), e.g.
    ``{"mod-threshold": {"capacity": 0.5, "bias_momentum": 0.8}}``; see ``Method.training_options``.
    Attaching an attached model returns its session (the same options, or none given); other options
    need :func:`detach` first. Everything is checked before the model is touched."""
    m = _require(model, "attach")
    options = {} if options is None else options
    opts = _validated(m, options)
    current = getattr(m, "_condify_training", None)
    if current is not None:
        if options and options != current.options:
            raise ConfigError(
                f"attach: the model is already attached with options {current.options}; call "
                f"condify.integrations.detach(model) first to change them to {options}"
            )
        return current
    hooks = {name: registry.get(name).training(m, o) for name, o in opts.items()}
    session = Session(m, hooks, options)
    for h in hooks.values():
        h.begin_forward()
    if hooks:
        owner = _owner(m)
        session.handle = owner.register_forward_pre_hook(_ForwardStart(owner, session))
    m._condify_training = session
    return session


def detach(model: Any) -> bool:
    """Undo :func:`attach` (stop recording, remove the hook; also after ``unmodify``); False if ``model``
    was not attached."""
    m = _unwrapped(model)
    session = None if m is None else m.__dict__.get("_condify_training")
    if session is None:
        return False
    for h in session.hooks.values():
        h.close()
    if session.handle is not None:
        session.handle.remove()
    del m.__dict__["_condify_training"]
    return True


def _session(model: Any, what: str) -> tuple[nn.Module | None, Session | None]:
    m = converted_model(model)
    if m is None:
        return None, None
    session = getattr(m, "_condify_training", None)
    if session is None:
        hooked = [c.method for c in applied_configs(m) if registry.get(c.method).training is not None]
        if hooked:
            raise ModifyError(
                f"{what}: {hooked} record per-step training terms, but this model is not attached; call "
                f"condify.integrations.attach(model) before the first training forward (CondifyTrainer and "
                f"CondifyCallback do it for the HF Trainer)"
            )
    return m, session


def _device(model: Any) -> torch.device:
    p = next(iter(model.parameters()), None)
    return torch.device("cpu") if p is None else p.device


def training_loss(model: Any) -> torch.Tensor:
    """The sum of the applied methods' auxiliary losses of the last forward of ``model``, a 0-dim fp32
    tensor to add to the task loss (zero when no method has one; any wrapper of a converted model, or a
    dense model, works). Needs :func:`attach` before that forward when a method records terms."""
    m, session = _session(model, "training_loss")
    zero = torch.zeros((), device=_device(model))
    if session is None:
        return zero
    terms = [t for h in session.hooks.values() if (t := h.loss()) is not None]
    return sum((t.float().reshape(()) for t in terms), zero)


def step(model: Any) -> dict[str, float]:
    """Per-step maintenance after an optimiser step (e.g. mod-threshold's bias move); returns each method's
    status as ``{"<method>/<key>": value}``. Under DDP/FSDP every rank must call it (it all-reduces)."""
    m, session = _session(model, "step")
    if session is None:
        return {}
    out: dict[str, float] = {}
    for name, h in session.hooks.items():
        out.update({f"{name}/{k}": v for k, v in h.after_step().items()})
    return out


# ----------------------------------------------------------------------------------------------------------
# FSDP units
# ----------------------------------------------------------------------------------------------------------


def fsdp_units(model: Any) -> list[list[nn.Module]]:
    """The decoder layers of the converted ``model`` grouped so that no FSDP unit splits what one condify
    site reads: one group per layer, a layer-parallel pair (its first layer computes both) as one group.

    FSDP2: :func:`fully_shard` (torch's, on each unit, then on the model). FSDP1:
    ``auto_wrap_policy=fsdp_wrap_policy(model)``. Sharding every decoder layer on its own (e.g.
    ``transformer_auto_wrap_policy`` or accelerate's ``TRANSFORMER_BASED_WRAP``) fails for layer-parallel:
    a pair's first layer would read its partner's weights while they are sharded."""
    m = _require(model, "fsdp_units")
    groups: list[list[nn.Module]] = []
    placed: set[int] = set()
    for layer in get_adapter(m).layer_list(m):
        if id(layer) in placed:
            continue
        patch = getattr(layer, "_condify_patch", None)
        partner = getattr(patch.state, "partner", None) if patch is not None else None
        group = [layer] + ([partner] if isinstance(partner, nn.Module) else [])
        placed.update(id(x) for x in group)
        groups.append(group)
    return groups


def fully_shard(model: Any, **kwargs: Any) -> nn.Module:
    """FSDP2 for a converted model: torch's ``fully_shard(unit, **kwargs)`` on each of :func:`fsdp_units`,
    then on the model; returns it. Strided parameters are made contiguous first (same values; FSDP2
    refuses them, and dynamic-k, lte and mot keep ``down_proj.weight`` column-major for the CPU kernel,
    which also reads the contiguous layout)."""
    from torch.distributed.fsdp import fully_shard as shard

    m = _require(model, "fully_shard")
    units = fsdp_units(m)
    with torch.no_grad():
        for p in m.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    for unit in units:
        shard(unit[0] if len(unit) == 1 else unit, **kwargs)
    return shard(m, **kwargs)


def fsdp_wrap_policy(model: Any) -> Any:
    """An FSDP1 ``auto_wrap_policy``: every decoder layer of :func:`fsdp_units` that is a unit alone
    gets its own FSDP unit; layers grouped with another (layer-parallel pairs) stay in their parent's."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    alone = {id(g[0]) for g in fsdp_units(model) if len(g) == 1}
    return CustomPolicy(lambda module: id(module) in alone)


# ----------------------------------------------------------------------------------------------------------
# HF Trainer (built on first use: importing the Trainer takes seconds)
# ----------------------------------------------------------------------------------------------------------


def _callback_class() -> type:
    from transformers.trainer_callback import TrainerCallback

    class CondifyCallback(TrainerCallback):
        """HF ``Trainer`` callback: :func:`attach` at the start of training (unless the model already is;
        ``options`` as there) and :func:`step` after every optimiser step (``last``: its status), detach at
        the end if it attached. It does not add the auxiliary loss: use :class:`CondifyTrainer`, or add
        ``condify.training_loss(model)`` in your ``compute_loss``."""

        def __init__(self, options: Options | None = None) -> None:
            self.options = options
            self.last: dict[str, float] = {}
            self._ours = False

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            ours = attached(model) is None
            attach(model, self.options)  # an attached model keeps its session; other options: ConfigError
            self._ours = ours

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self.last = step(model)

        def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if self._ours:
                detach(model)
                self._ours = False

    CondifyCallback.__module__ = __name__
    return CondifyCallback


def _trainer_class() -> type:
    from transformers import Trainer

    class CondifyTrainer(Trainer):
        """A ``transformers.Trainer`` for condify models: adds :func:`training_loss` to every training
        loss (scaled for gradient accumulation as the Trainer scales the task loss), runs the per-step
        maintenance (a :class:`CondifyCallback` with ``condify_options``) and logs its status as
        ``condify/<method>/<key>``."""

        def __init__(self, *args: Any, condify_options: Options | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.condify_callback = _lazy("CondifyCallback")(condify_options)
            self.add_callback(self.condify_callback)

        def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is not None:
                return bool(scaled)
            accepts = getattr(self, "model_accepts_loss_kwargs", False)
            return (accepts and num_items_in_batch is not None) or self.compute_loss_func is not None

        def compute_loss(
            self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:  # fmt: skip
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            if model.training:
                aux = training_loss(model)
                if self._loss_scaled_for_ga(num_items_in_batch):  # the Trainer will not divide it
                    aux = aux / getattr(self, "current_gradient_accumulation_steps", 1)
                loss = loss + aux.to(loss.device)
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs and self.condify_callback.last:
                logs = {**logs, **{f"condify/{k}": v for k, v in self.condify_callback.last.items()}}
            super().log(logs, *args, **kwargs)

    CondifyTrainer.__module__ = __name__
    return CondifyTrainer


_LAZY: dict[str, Any] = {"CondifyCallback": _callback_class, "CondifyTrainer": _trainer_class}


def _lazy(name: str) -> type:
    if name not in globals():
        globals()[name] = _LAZY[name]()
    return globals()[name]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return _lazy(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
