"""The two dynamic-k stages that fine-tune model weights: sparsification (stage 1) and adaptation to
the routed selection (stage 5). Both distil from the original dense model (``teacher``) or use the
LM loss when there is none."""

from __future__ import annotations

import torch
from torch import nn

from ...convert import update_config
from ...run import Run
from ...training import distill_loss, short_warmup
from .config import DynamicKConfig
from .losses import PENALTIES
from .modules import converted, mode

PARAMS = ("mlp", "all")


def _set_activation(model: nn.Module, cfg: DynamicKConfig, act: str) -> None:
    for _, m in converted(model):
        m._condify_patch.state.activation = act
    update_config(model, cfg.replace(activation=act if act == "relu" else cfg.activation))


def _trainable(model: nn.Module, params: str) -> list[nn.Parameter]:
    """Everything but the routers (``"all"``), or the converted sites' own weights (``"mlp"``)."""
    if params == "all":
        return [q for n, q in model.named_parameters() if ".router." not in n]
    return [q for _, m in converted(model) for n, q in m.named_parameters() if not n.startswith("router.")]


def sparsify_(
    model: nn.Module,
    cfg: DynamicKConfig,
    run: Run,
    teacher: nn.Module | None,
    *,
    activation: str | None,
    penalty: str,
    penalty_weight: float,
    steps: int,
    lr: float,
    params: str,
) -> list[float]:
    """Stage 1: ReLU swap (optional) and fine-tune with the activation-sparsity penalty."""
    if activation == "relu":
        _set_activation(model, cfg, "relu")
    mlps = [m for _, m in converted(model)]
    pen = PENALTIES[penalty]
    recs: list[torch.Tensor] = []

    def penalty_term() -> torch.Tensor:
        total = penalty_weight * sum(pen(h) for h in recs)
        recs.clear()
        return total

    for m in mlps:
        m._condify_patch.state.record = recs
    try:
        with mode(model, "dense"):
            return run.train(
                _trainable(model, params), steps, distill_loss(teacher, extra=penalty_term),
                lr=lr, warmup=max(1, steps // 10), desc="sparsify",
            )  # fmt: skip
    finally:
        for m in mlps:
            m._condify_patch.state.record = None


def adapt_(
    model: nn.Module,
    run: Run,
    teacher: nn.Module | None,
    *,
    steps: int,
    lr: float,
    params: str,
    lr_scale: str,
) -> list[float]:
    """Stage 5: fine-tune the model under its own routing (mode ``"masked"``: each token's unselected
    experts contribute nothing, exactly as in ``"sparse"``); routers and thresholds stay fixed. Rates
    scaled to the weights (``lr_scale``, :func:`condify.training.scale_to_weights`), warm-up over a
    quarter of the steps. Over several passes the model ends at the pass that scored best on the hold-out
    (``best_pass``, :meth:`condify.run.Run.train`)."""
    with mode(model, "masked"):
        return run.train(
            _trainable(model, params), steps, distill_loss(teacher),
            lr=lr, lr_scale=lr_scale, warmup=short_warmup(steps), desc="adapt", best_pass=True,
        )  # fmt: skip
