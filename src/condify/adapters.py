"""Architecture adapters: where decoder layers, attention, MLP and norms live. Data, not code.

Each :class:`Adapter` names submodules relative to the model (``layers``) or to one decoder layer.
Unknown ``model_type`` values go through a structural fallback; when neither works,
:func:`get_adapter` raises and lists the supported architectures.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's architecture cannot be handled by any adapter."""


@dataclass(frozen=True)
class Adapter:
    """Names of the parts of a decoder-only transformer (relative paths, dotted)."""

    name: str
    layers: str = "model.layers"  # from the top-level model
    attn: str = "self_attn"  # from a decoder layer
    mlp: str = "mlp"
    attn_norm: str | None = "input_layernorm"  # None: no pre-norm (OLMo-2 normalises after the blocks)
    attn_post_norm: str | None = None  # sandwich norms (Gemma 2/3), post-norms (OLMo-2)
    mlp_norm: str | None = "post_attention_layernorm"
    mlp_post_norm: str | None = None
    q: str | None = "q_proj"  # from the attention module
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None  # fused q|k|v projection (Phi-3, GPT-2)
    gate: str | None = "gate_proj"  # from the MLP module; None for non-GLU MLPs
    up: str | None = "up_proj"  # None when fused into gate_up
    down: str = "down_proj"
    gate_up: str | None = None  # fused [gate; up] projection (Phi-3)
    act: str = "act_fn"
    conv1d: bool = False  # GPT-2 Conv1D stores weights as (in, out)
    residual_scale: str | None = None  # decoder-layer attribute scaling both residual updates (Granite)
    norm_offset: float = 0.0  # Gemma RMSNorm multiplies by (1 + weight)
    qk_norm: bool = False  # per-head q/k norms inside attention (Qwen3, Gemma3)
    fusable: bool = False  # layer-parallel may fuse pairs into wide GEMMs

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def part(self, layer: nn.Module, name: str | None) -> nn.Module | None:
        return None if name is None else layer.get_submodule(name)

    def attn_update(self, layer: nn.Module, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """What ``layer``'s attention adds to the residual stream ``x`` (norms and residual scale applied)."""
        out = layer.get_submodule(self.attn)(hidden_states=self.norm(layer, self.attn_norm, x), **kwargs)
        return self._residual(layer, self.attn_post_norm, _first(out))

    def mlp_update(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """What ``layer``'s MLP adds to the residual stream ``h`` (norms and residual scale applied)."""
        out = layer.get_submodule(self.mlp)(self.norm(layer, self.mlp_norm, h))
        return self._residual(layer, self.mlp_post_norm, out)

    @staticmethod
    def norm(layer: nn.Module, name: str | None, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s norm ``name`` applied to ``x`` (``x`` itself when the adapter names none)."""
        return x if name is None else layer.get_submodule(name)(x)

    def _residual(self, layer: nn.Module, post_norm: str | None, out: torch.Tensor) -> torch.Tensor:
        out = self.norm(layer, post_norm, out)
        return out if self.residual_scale is None else out * getattr(layer, self.residual_scale)

    def mlp_weights(self, mlp: nn.Module) -> dict[str, torch.Tensor | None]:
        """The MLP as nn.Linear-layout weights: gate/up (I, d), down (d, I), biases; views, no copies."""

        def lin(name: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            if name is None:
                return None, None
            m = getattr(mlp, name) if "." not in name else mlp.get_submodule(name)  # hot path: cheap
            w = m.weight.t() if self.conv1d else m.weight
            return w, getattr(m, "bias", None)

        if self.gate_up is not None:
            w, b = lin(self.gate_up)
            half = w.shape[0] // 2
            gate, up = w[:half], w[half:]
            b_gate, b_up = (None, None) if b is None else (b[:half], b[half:])
        else:
            gate, b_gate = lin(self.gate)
            up, b_up = lin(self.up)
        down, b_down = lin(self.down)
        return {"gate": gate, "up": up, "down": down, "b_gate": b_gate, "b_up": b_up, "b_down": b_down}


_LLAMA = Adapter("llama", fusable=True)
_GEMMA2 = dataclasses.replace(
    _LLAMA,
    name="gemma2",
    attn_post_norm="post_attention_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
    norm_offset=1.0,
    fusable=False,
)
ADAPTERS: dict[str, Adapter] = {
    "llama": _LLAMA,
    "mistral": dataclasses.replace(_LLAMA, name="mistral"),
    "qwen2": dataclasses.replace(_LLAMA, name="qwen2"),
    "qwen3": dataclasses.replace(_LLAMA, name="qwen3", qk_norm=True, fusable=False),
    "gemma": dataclasses.replace(_LLAMA, name="gemma", norm_offset=1.0),
    "gemma2": _GEMMA2,
    "gemma3_text": dataclasses.replace(_GEMMA2, name="gemma3_text", qk_norm=True),
    "phi3": dataclasses.replace(
        _LLAMA,
        name="phi3",
        q=None,
        k=None,
        v=None,
        qkv="qkv_proj",
        gate=None,
        up=None,
        gate_up="gate_up_proj",
        act="activation_fn",
        fusable=False,
    ),
    "olmo2": dataclasses.replace(
        _LLAMA,
        name="olmo2",
        attn_norm=None,
        attn_post_norm="post_attention_layernorm",
        mlp_norm=None,
        mlp_post_norm="post_feedforward_layernorm",
        fusable=False,
    ),
    "granite": dataclasses.replace(
        _LLAMA, name="granite", residual_scale="residual_multiplier", fusable=False
    ),
    "starcoder2": dataclasses.replace(
        _LLAMA, name="starcoder2", gate=None, up="c_fc", down="c_proj", act="act", fusable=False
    ),
    "gpt2": Adapter(
        "gpt2",
        layers="transformer.h",
        attn="attn",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        q=None,
        k=None,
        v=None,
        qkv="c_attn",
        o="c_proj",
        gate=None,
        up="c_fc",
        down="c_proj",
        act="act",
        conv1d=True,
    ),
}


def supported() -> list[str]:
    return sorted(ADAPTERS)


_MLPS = (  # (gate, up, down, gate_up): GLU, fused GLU (Phi-3, GLM), plain up/down (Arcee, StarCoder2)
    ("gate_proj", "up_proj", "down_proj", None),
    (None, None, "down_proj", "gate_up_proj"),
    (None, "up_proj", "down_proj", None),
    (None, "c_fc", "c_proj", None),
)


def _structural(model: nn.Module) -> list[Adapter]:
    """Candidate adapters for an unknown decoder-only model, guessed from its module tree (each still
    has to pass :func:`verify`): the layer list, its attention and MLP children, the projections they
    hold, and the norms in registration order, read as sandwich norms (four: attention pre/post, MLP
    pre/post, as Gemma-2/3), as pre-norms, or as post-norms (two, after the blocks, as OLMo-2)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or (n is not None and len(mod) != n):
            continue
        layer = mod[0]
        children = dict(layer.named_children())
        attn = next((c for c in children if "attn" in c or "attention" in c), None)
        mlp = next((c for c in children if c in ("mlp", "feed_forward", "ffn")), None)
        norms = [c for c, m in children.items() if "norm" in type(m).__name__.lower() or "ln" in c]
        if attn is None or mlp is None or len(norms) < 2:
            continue
        attn_children = set(dict(layer.get_submodule(attn).named_children()))
        mlp_children = set(dict(layer.get_submodule(mlp).named_children()))
        if {"q_proj", "k_proj", "v_proj"} <= attn_children:
            proj = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "qkv": None}
        elif "qkv_proj" in attn_children:
            proj = {"q": None, "k": None, "v": None, "qkv": "qkv_proj"}
        else:
            continue
        shape = next((m for m in _MLPS if all(x in mlp_children for x in m if x)), None)
        if shape is None or "o_proj" not in attn_children:
            continue
        gate, up, down, gate_up = shape
        act = next((a for a in ("act_fn", "activation_fn", "act") if a in mlp_children), "act_fn")
        scale = (
            "residual_multiplier" if isinstance(getattr(layer, "residual_multiplier", None), float) else None
        )
        base = dataclasses.replace(
            _LLAMA, name=f"structural:{path}", layers=path, attn=attn, mlp=mlp, **proj, gate=gate, up=up,
            down=down, gate_up=gate_up, act=act, residual_scale=scale, fusable=False,
        )  # fmt: skip
        out = []
        if len(norms) == 4:
            a_pre, a_post, m_pre, m_post = norms
            out.append(dataclasses.replace(
                base, name=f"{base.name}:sandwich", attn_norm=a_pre, attn_post_norm=a_post, mlp_norm=m_pre,
                mlp_post_norm=m_post,
            ))  # fmt: skip
        out.append(dataclasses.replace(base, attn_norm=norms[0], mlp_norm=norms[1]))
        if len(norms) == 2:  # norms after the blocks, none before (OLMo-2, EXAONE-4)
            out.append(dataclasses.replace(
                base, name=f"{base.name}:post", attn_norm=None, attn_post_norm=norms[0], mlp_norm=None,
                mlp_post_norm=norms[1],
            ))  # fmt: skip
        return out
    return []


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model`` (by ``config.model_type``, else structural), validated against it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is not None:
        _check(model, adapter)
        return adapter
    candidates = _structural(model)
    if not candidates:
        raise UnsupportedModelError(
            f"condify does not know how to convert model_type {model_type!r} ({type(model).__name__}): "
            f"no adapter and the structural fallback found no decoder-layer list with attention (q/k/v or "
            f"qkv and o projections), a known MLP layout and two norms. Supported model types: {supported()}."
        )
    # a model condify already converted runs its forwards, not the original blocks (which may need
    # particular inputs): it was verified when it was converted (its sites keep the adapter they were
    # built with), and unmodify needs only the paths, which every candidate shares
    converted = any(hasattr(m, "_condify_patch") for m in model.modules())
    known = _VERIFIED.get(model)
    for a in candidates:
        if a.name == known or converted:
            _check(model, a)
            return a
    first: UnsupportedModelError | None = None
    for a in candidates:  # the first view that reproduces every layer exactly
        try:
            _check(model, a)
            verify(model, a)
        except UnsupportedModelError as e:
            first = first or e
            continue
        _VERIFIED[model] = a.name
        return a
    assert first is not None
    raise first


_VERIFIED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


_ACTS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "relu": torch.nn.functional.relu}


def _first(x: object) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def verify(model: nn.Module, a: Adapter, *, tokens: int = 6, seed: int = 0) -> None:
    """Check that ``a``'s view of every decoder layer is exact on a small random input; raise
    :class:`UnsupportedModelError` otherwise (what the structural fallback must pass).

    One forward of ``tokens`` random ids records each layer's input and output and its attention and
    MLP calls; the adapter's view must reproduce them: attention input = ``attn_norm(x)``, MLP input =
    ``mlp_norm(x + attn)``, MLP output = ``down(act(gate(u)) * up(u))`` from :meth:`Adapter.mlp_weights`
    and the named activation, layer output = ``x + attn + mlp`` (with post-norms and a residual scale,
    ``attn`` and ``mlp`` pass through them first). The model's weights, modes and flags are untouched."""
    layers = a.layer_list(model)
    ref = next((p for p in model.parameters()), None)
    if ref is None or ref.device.type == "meta":
        raise UnsupportedModelError(
            f"{type(model).__name__}: condify cannot check the structural adapter on a model without "
            f"materialised weights (meta device); load its weights first"
        )
    vocab = getattr(model.config, "vocab_size", None) or model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen).to(ref.device)
    rec: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []

    def pre(key: tuple[int, str]):
        def f(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            rec[key] = args[0] if args else kwargs["hidden_states"]

        return f

    def post(key: tuple[int, str]):
        def f(mod: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
            rec[key] = _first(out)

        return f

    for i, layer in enumerate(layers):
        for part, mod in (
            ("layer", layer),
            ("attn", layer.get_submodule(a.attn)),
            ("mlp", layer.get_submodule(a.mlp)),
        ):
            hooks.append(mod.register_forward_pre_hook(pre((i, part + "_in")), with_kwargs=True))
            hooks.append(mod.register_forward_hook(post((i, part + "_out")), with_kwargs=True))
    modes = {n: m.training for n, m in model.named_modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
            for i, layer in enumerate(layers):
                _verify_layer(a, layer, i, rec)
    except UnsupportedModelError:
        raise
    except Exception as e:
        raise UnsupportedModelError(
            f"{type(model).__name__}: the structural adapter {a.name!r} could not be checked on a random "
            f"input ({type(e).__name__}: {e}); supported model types: {supported()}"
        ) from None
    finally:
        for h in hooks:
            h.remove()
        for n, m in model.named_modules():
            m.training = modes.get(n, m.training)


def _verify_layer(a: Adapter, layer: nn.Module, i: int, rec: dict[tuple[int, str], torch.Tensor]) -> None:
    x, out = rec[(i, "layer_in")], rec[(i, "layer_out")]
    attn_in, attn_out = rec[(i, "attn_in")], rec[(i, "attn_out")]
    mlp_in, mlp_out = rec[(i, "mlp_in")], rec[(i, "mlp_out")]
    mlp = layer.get_submodule(a.mlp)
    w = a.mlp_weights(mlp)
    act_mod = getattr(mlp, a.act, None)
    act = act_mod if callable(act_mod) else _ACTS.get(str(act_mod))
    if act is None:
        raise UnsupportedModelError(f"layer {i}: the MLP activation {a.act!r} is not a callable")
    lin = torch.nn.functional.linear
    u = mlp_in
    hidden = (
        act(lin(u, w["gate"], w["b_gate"])) * lin(u, w["up"], w["b_up"])
        if w["gate"] is not None
        else act(lin(u, w["up"], w["b_up"]))
    )
    h = x + a._residual(layer, a.attn_post_norm, attn_out)
    m = a._residual(layer, a.mlp_post_norm, mlp_out)
    checks = {
        "attention input = attn_norm(x)": (attn_in, a.norm(layer, a.attn_norm, x)),
        "MLP input = mlp_norm(x + attention)": (mlp_in, a.norm(layer, a.mlp_norm, h)),
        "MLP output = down(act(gate) * up)": (mlp_out, lin(hidden, w["down"], w["b_down"])),
        "layer output = x + attention + MLP": (out, h + m),
    }
    for what, (got, want) in checks.items():
        if got.shape != want.shape or not _close(got, want):
            raise UnsupportedModelError(
                f"the structural adapter {a.name!r} does not reproduce decoder layer {i} on a random input "
                f"({what} does not hold); condify refuses to convert an architecture it cannot reproduce "
                f"exactly. Supported model types: {supported()}."
            )


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    tol = 1e-4 if got.dtype in (torch.float32, torch.float64) else 2e-2
    scale = float(want.abs().max()) + 1e-6
    return float((got.float() - want.float()).abs().max()) <= tol * scale


def _check(model: nn.Module, a: Adapter) -> None:
    try:
        layers = a.layer_list(model)
        for layer in layers:
            for name in (a.attn, a.mlp, a.attn_norm, a.mlp_norm, a.attn_post_norm, a.mlp_post_norm):
                a.part(layer, name)
            attn, mlp = layer.get_submodule(a.attn), layer.get_submodule(a.mlp)
            for name in (a.q, a.k, a.v, a.o, a.qkv):
                a.part(attn, name)
            for name in (a.gate, a.up, a.down, a.gate_up, a.act):
                a.part(mlp, name)
    except AttributeError as e:
        raise UnsupportedModelError(
            f"adapter {a.name!r} does not match {type(model).__name__}: {e}. "
            f"Supported model types: {supported()}."
        ) from None
