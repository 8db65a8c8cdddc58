"""Scaling a tensor into a narrow format's range before rounding it.

A narrow format covers a few binades; a tensor's values may sit far from
them. Scaling multiplies by a power of two chosen from the tensor's absolute
maximum (amax) so the largest value lands near the format's largest finite
value, rounds, and divides the scale back out. Powers of two make scaling
itself exact, so the only error is the rounding.

- :class:`CurrentScaler`: scale from this tensor's own amax (per tensor).
- :class:`DelayedScaler`: scale from a history of past amaxes (as fp8
  training recipes do), so the scale is known before the tensor is.
- :func:`quantize_mx`: OCP Microscaling (MX v1.0) blocks: one E8M0 scale per
  block of 32 values along the last dimension.

Scales stay tensors on the data's device: nothing here forces a host sync.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from adaprec.errors import AdaprecError, CheckpointError, FormatSpecError
from adaprec.formats.quantize import quantize
from adaprec.formats.registry import Format, get

__all__ = [
    "CurrentScaler",
    "DelayedScaler",
    "ScalingError",
    "pow2_scale",
    "quantize_mx",
    "mx_formats",
    "MX_FORMATS",
]

_SCALE_EMIN, _SCALE_EMAX = -126, 126  # keep 2^k a normal float32
_E8M0_EMIN, _E8M0_EMAX = -127, 127

#: OCP MX v1.0 concrete formats: name -> (element format, block size).
MX_FORMATS: dict[str, tuple[str, int]] = {
    "mxfp8_e4m3": ("fp8_e4m3", 32),
    "mxfp8_e5m2": ("fp8_e5m2", 32),
    "mxfp6_e3m2": ("fp6_e3m2", 32),
    "mxfp6_e2m3": ("fp6_e2m3", 32),
    "mxfp4_e2m1": ("fp4_e2m1", 32),
    "mxint8": ("int8", 32),
}


class ScalingError(AdaprecError, ValueError):
    """Impossible scaling arguments (margin, history length, reduce mode, block size)."""


def mx_formats() -> list[str]:
    """Names of the OCP MX formats :func:`quantize_mx` accepts as ``elem_fmt``."""
    return list(MX_FORMATS)


def _floor_log2(v: torch.Tensor) -> torch.Tensor:
    """floor(log2(v)) exactly for positive finite float32 v (frexp, no log rounding)."""
    _, e = torch.frexp(v)
    return e.to(torch.int32) - 1


def _exp2i(k: torch.Tensor) -> torch.Tensor:
    """2^k for integer k in [-126, 127], built from the float32 bit pattern (exact)."""
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32)


def pow2_scale(amax: torch.Tensor, fmt: str | Format, margin: int = 0) -> torch.Tensor:
    """Largest power of two ``s`` with ``amax * s <= max_finite``, divided by ``2^margin``.

    Computed exactly from frexp mantissas and exponents (``log2`` of a ratio
    can round up across a power of two). Returns 1 where amax is 0 or not
    finite, and keeps ``s`` a normal float32 (2^-126 .. 2^126).
    """
    f = get(fmt)
    amax = amax.detach().to(torch.float32)
    ok = torch.isfinite(amax) & (amax > 0)
    safe = torch.where(ok, amax, torch.ones_like(amax))
    m_a, e_a = torch.frexp(safe)
    m_f, e_f = torch.frexp(torch.tensor(f.max_finite, dtype=torch.float32, device=amax.device))
    k = (e_f - e_a).to(torch.int32) - (m_f < m_a).to(torch.int32) - margin
    k = torch.clamp(k, _SCALE_EMIN, _SCALE_EMAX)
    return torch.where(ok, _exp2i(k), torch.ones_like(amax))


def _check_margin(margin: int) -> int:
    if not isinstance(margin, int) or isinstance(margin, bool) or margin < 0:
        raise ScalingError(f"margin is a number of binades of headroom, an int >= 0; got {margin!r}")
    return margin


def _scaled_quantize(
    x: torch.Tensor, fmt: Format, scale: torch.Tensor, rounding: str, seed: int | None
) -> torch.Tensor:
    x32 = x.detach().to(torch.float32)
    return quantize(x32 * scale, fmt, rounding, seed=seed, saturate=True) / scale


class CurrentScaler:
    """Per-tensor scaling from the tensor's own amax.

    ``scale = 2^(floor(log2(max_finite / amax)) - margin)``; ``margin`` binades
    of headroom trade range for protection against a larger next value.
    """

    def __init__(self, fmt: str | Format, margin: int = 0) -> None:
        self.fmt = get(fmt)
        self.margin = _check_margin(margin)
        self.last_scale: torch.Tensor = torch.tensor(1.0)

    def quantize(self, x: torch.Tensor, rounding: str = "nearest", seed: int | None = None) -> torch.Tensor:
        """``x * scale`` rounded to the format (saturating), then ``/ scale``; float32."""
        amax = x.detach().abs().amax().to(torch.float32) if x.numel() else torch.zeros((), device=x.device)
        scale = pow2_scale(amax, self.fmt, self.margin)
        self.last_scale = scale
        return _scaled_quantize(x, self.fmt, scale, rounding, seed)

    def state_dict(self) -> dict[str, Any]:
        return {"fmt": self.fmt.name, "margin": self.margin, "last_scale": self.last_scale.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _require(state, ("fmt", "margin", "last_scale"), "CurrentScaler")
        self.fmt = get(state["fmt"])
        self.margin = _check_margin(int(state["margin"]))
        self.last_scale = torch.as_tensor(state["last_scale"], dtype=torch.float32).clone()


_REDUCES = ("max", "most_recent")


class DelayedScaler:
    """Per-tensor scaling from a history of past amaxes.

    The scale for call ``t`` comes from the amaxes of calls before ``t``
    (their maximum, or the most recent one); this call's amax is pushed into
    the ring buffer afterwards. With no usable history (first call, or only
    zero/non-finite amaxes seen) the current amax is used. A non-finite amax
    is not recorded (the previous entry is repeated), so one overflow does not
    poison ``history`` steps of scales.
    """

    def __init__(
        self, fmt: str | Format, history: int = 16, reduce: str = "max", margin: int = 0
    ) -> None:
        if not isinstance(history, int) or isinstance(history, bool) or history < 1:
            raise ScalingError(f"history is the number of past amaxes kept, an int >= 1; got {history!r}")
        if reduce not in _REDUCES:
            raise ScalingError(f"unknown amax reduce {reduce!r}; use one of {', '.join(_REDUCES)}")
        self.fmt = get(fmt)
        self.history_len = history
        self.reduce = reduce
        self.margin = _check_margin(margin)
        self.amax_history = torch.zeros(history, dtype=torch.float32)
        self.count = 0  # entries filled so far (<= history)
        self.pos = 0  # next slot to write
        self.last_scale: torch.Tensor = torch.tensor(1.0)

    def _history_amax(self, device: torch.device) -> torch.Tensor:
        hist = self.amax_history.to(device)
        if self.count == 0:
            return torch.zeros((), device=device)
        if self.reduce == "most_recent":
            return hist[(self.pos - 1) % self.history_len]
        return hist[: self.count].amax()

    def quantize(self, x: torch.Tensor, rounding: str = "nearest", seed: int | None = None) -> torch.Tensor:
        """Quantize with the scale from past amaxes, then record this tensor's amax."""
        dev = x.device
        amax = x.detach().abs().amax().to(torch.float32) if x.numel() else torch.zeros((), device=dev)
        past = self._history_amax(dev)
        used = torch.where(past > 0, past, amax)
        scale = pow2_scale(used, self.fmt, self.margin)
        self.last_scale = scale
        out = _scaled_quantize(x, self.fmt, scale, rounding, seed)
        self._push(amax)
        return out

    def _push(self, amax: torch.Tensor) -> None:
        if self.amax_history.device != amax.device:
            self.amax_history = self.amax_history.to(amax.device)
        prev = self.amax_history[(self.pos - 1) % self.history_len] if self.count else torch.zeros_like(amax)
        self.amax_history[self.pos] = torch.where(torch.isfinite(amax), amax, prev)
        self.pos = (self.pos + 1) % self.history_len
        self.count = min(self.count + 1, self.history_len)

    def state_dict(self) -> dict[str, Any]:
        return {
            "fmt": self.fmt.name,
            "history_len": self.history_len,
            "reduce": self.reduce,
            "margin": self.margin,
            "amax_history": self.amax_history.detach().cpu().clone(),
            "count": self.count,
            "pos": self.pos,
            "last_scale": self.last_scale.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = ("fmt", "history_len", "reduce", "margin", "amax_history", "count", "pos", "last_scale")
        _require(state, keys, "DelayedScaler")
        hist = torch.as_tensor(state["amax_history"], dtype=torch.float32)
        n = int(state["history_len"])
        if hist.shape != (n,) or not 0 <= int(state["count"]) <= n or not 0 <= int(state["pos"]) < n:
            raise CheckpointError(
                f"DelayedScaler state is inconsistent: history_len={n}, amax_history shape "
                f"{tuple(hist.shape)}, count={state['count']}, pos={state['pos']}; "
                "load a state dict saved by DelayedScaler.state_dict()"
            )
        if state["reduce"] not in _REDUCES:
            raise CheckpointError(f"DelayedScaler state has unknown reduce {state['reduce']!r}")
        self.fmt = get(state["fmt"])
        self.history_len = n
        self.reduce = state["reduce"]
        self.margin = _check_margin(int(state["margin"]))
        self.amax_history = hist.clone().to(self.amax_history.device)
        self.count = int(state["count"])
        self.pos = int(state["pos"])
        self.last_scale = torch.as_tensor(state["last_scale"], dtype=torch.float32).clone()


def _require(state: dict[str, Any], keys: tuple[str, ...], owner: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(
            f"{owner} state dict is missing {', '.join(missing)}; "
            f"load a state dict saved by {owner}.state_dict()"
        )


def _elem_emax(f: Format) -> int:
    """Exponent of the element format's largest power of two (emax_elem in the MX spec)."""
    return math.frexp(f.max_finite)[1] - 1 if f.kind == "int" else f.emax


def quantize_mx(
    x: torch.Tensor,
    elem_fmt: str | Format,
    block_size: int = 32,
    rounding: str = "nearest",
    seed: int | None = None,
) -> torch.Tensor:
    """Round ``x`` to an OCP MX block format (spec v1.0) and return float32 values.

    Blocks of ``block_size`` consecutive values along the last dimension share
    one E8M0 scale ``X = 2^(floor(log2(amax_block)) - emax_elem)``, clamped
    to ``2^-127 .. 2^127``; each value ``v / X`` is rounded to ``elem_fmt``
    with saturation (values above the element maximum clamp to it, as the
    spec's conversion does), and the result is ``X * element``. A last block
    shorter than ``block_size`` is its own block. An all-zero block stays
    zero. A block holding a NaN or an infinity gets a NaN scale, so every
    value of that block is NaN (E8M0 encodes NaN, most element formats
    cannot). ``elem_fmt`` may also be an MX name such as ``"mxfp4_e2m1"``;
    fixed-point elements (e.g. ``"int8"``, i.e. MXINT8) use the exponent of
    their largest value as ``emax_elem``.
    """
    if isinstance(elem_fmt, str) and elem_fmt.strip().lower() in MX_FORMATS:
        elem_fmt = MX_FORMATS[elem_fmt.strip().lower()][0]
    f = get(elem_fmt)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ScalingError(f"block_size must be an int >= 1 (the MX spec uses 32); got {block_size!r}")
    if not torch.is_floating_point(x):
        raise FormatSpecError(f"quantize_mx needs a floating tensor, got dtype {x.dtype}")
    x32 = x.detach().to(torch.float32)
    shape = x32.shape
    if x32.numel() == 0:
        return x32.clone()
    rows = x32.reshape(-1, shape[-1] if x32.dim() else 1)
    n = rows.shape[-1]
    pad = (-n) % block_size
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    blocks = rows.reshape(rows.shape[0], -1, block_size)
    amax = blocks.abs().amax(dim=-1, keepdim=True)  # NaN propagates
    special = ~torch.isfinite(amax)
    pos = amax > 0
    e = _floor_log2(torch.where(pos & ~special, amax, torch.ones_like(amax))) - _elem_emax(f)
    e = torch.clamp(torch.where(pos, e, torch.full_like(e, _E8M0_EMIN)), _E8M0_EMIN, _E8M0_EMAX)
    # v / X and X * q as two exact power-of-two multiplications (2^127 / 2^-127 both fit)
    inv = _exp2i(-e)
    elems = quantize(blocks * inv, f, rounding, seed=seed, saturate=True)
    half = torch.div(e, 2, rounding_mode="floor")
    out = elems * _exp2i(half) * _exp2i(e - half)
    out = torch.where(special, torch.full_like(out, float("nan")), out)
    out = out.reshape(rows.shape[0], -1)[:, :n]
    return out.reshape(shape)
