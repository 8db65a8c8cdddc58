"""Roofline arithmetic for a target device: time and energy of work that did not run here.

Pure functions of counted work (MACs, bytes) and a ``roofline`` profile; they
know nothing of plans, models or the controller. Used by
:mod:`adaprec.simulation` to price a step *simulated for* a target.

A piece of work (one GEMM call with its backward GEMMs, or a stream of bytes)
takes::

    compute_s = sum over GEMMs 2 x MACs / (peak(format) x compute_efficiency)
    memory_s  = bytes / (bandwidth x memory_efficiency)
    time_s    = max(compute_s, memory_s)            # the roofline
    energy_j  = time_s x board power                # an upper-bound style estimate

``compute_efficiency`` and ``memory_efficiency`` are the profile's achievable
fractions (an MFU-like calibration from a published measured throughput,
named in the profile); 1.0 where the profile has none.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from adaprec.energy.profiles import Profile
from adaprec.errors import ProfileError

__all__ = ["RooflineTime", "gemm_time", "bytes_time", "energy_j", "check_roofline", "load_target"]


@dataclass(frozen=True)
class RooflineTime:
    """Modeled seconds of some work: its compute and memory terms, and its time.

    For one piece of work ``time_s = max(compute_s, memory_s)``
    (:meth:`of`); pieces done one after another add (``a + b``), each
    keeping its own bound.
    """

    compute_s: float
    memory_s: float
    time_s: float

    @classmethod
    def of(cls, compute_s: float, memory_s: float) -> RooflineTime:
        return cls(compute_s, memory_s, max(compute_s, memory_s))

    @property
    def bound(self) -> str:
        """``compute`` or ``memory``: the larger term."""
        return "compute" if self.compute_s >= self.memory_s else "memory"

    def __add__(self, other: RooflineTime) -> RooflineTime:
        return RooflineTime(self.compute_s + other.compute_s, self.memory_s + other.memory_s,
                            self.time_s + other.time_s)


def check_roofline(profile: Profile) -> Profile:
    """``profile`` if it is a roofline profile, else a ProfileError naming the roofline profiles."""
    if profile.kind != "roofline":
        from adaprec.energy.profiles import list_profiles, load_profile

        names = [n for n in list_profiles() if load_profile(n).kind == "roofline"]
        raise ProfileError(
            f"target {profile.name!r} is an energy table, not a device with a roofline; "
            f"use one of {', '.join(names)} (or a TOML file of kind 'roofline')"
        )
    return profile


def gemm_time(profile: Profile, macs_by_format: Iterable[tuple[str, int]], nbytes: float) -> RooflineTime:
    """Roofline time of GEMMs (``(format, MACs)`` pairs) that together move ``nbytes``."""
    compute = 0.0
    for fmt, macs in macs_by_format:
        peak, _ = profile.peak(fmt)
        compute += 2.0 * macs / (peak * profile.compute_efficiency)
    return RooflineTime.of(compute, bytes_time(profile, nbytes))


def bytes_time(profile: Profile, nbytes: float) -> float:
    """Seconds to stream ``nbytes`` through memory at the achievable bandwidth."""
    return nbytes / (profile.bandwidth_bytes_s * profile.memory_efficiency)


def energy_j(profile: Profile, seconds: float) -> float:
    """Modeled joules of ``seconds`` of work: at board power (an upper-bound style estimate)."""
    return seconds * profile.board_power_w


def load_target(target: str | Profile) -> Profile:
    """A roofline profile by bundled name or TOML path; an unknown name gets the list of known targets."""
    from pathlib import Path

    from adaprec.energy.profiles import list_profiles, load_profile

    if isinstance(target, Profile):
        return check_roofline(target)
    if str(target) not in list_profiles() and not Path(str(target)).is_file():
        names = [n for n in list_profiles() if load_profile(n).kind == "roofline"]
        raise ProfileError(
            f"unknown target {str(target)!r}: the known targets are {', '.join(names)}; "
            "or pass the path of a TOML profile of kind 'roofline' (see docs/energy.md)"
        )
    return check_roofline(load_profile(target))
