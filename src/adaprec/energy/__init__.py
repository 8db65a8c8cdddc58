"""The energy ledger: the cost of every training step under its precision plan.

Counting (:class:`MacCounter`) sees the GEMMs a step runs; an op-level
count (:class:`TrafficCounter`, replayed by a :class:`TrafficBook`) sees
every byte its ops read and write; a device profile (:func:`load_profile`)
prices them per format; the ledger
(:class:`EnergyLedger`) keeps per-step and cumulative figures against fp32
and bf16 counterfactuals; meters (:func:`detect_meter`) add measured joules
where the machine has a counter. Modeled and measured figures are always
labelled as such. See docs/energy.md.
"""

from adaprec.energy.bitops import bitops
from adaprec.energy.calibrate import calibrate
from adaprec.energy.counting import GemmCost, ModuleCost, StepCost
from adaprec.energy.ledger import EnergyLedger
from adaprec.energy.meters import MeasurementWindow, Meter, NvmlMeter, RaplMeter, ZeusMeter, detect_meter
from adaprec.energy.model import PricedStep, price_step
from adaprec.energy.profiles import Profile, list_profiles, load_profile
from adaprec.energy.traffic import StepTraffic, TrafficCounter
from adaprec.energy.traffic_book import TrafficBook, input_signature

__all__ = [
    "MacCounter",
    "StepCost",
    "ModuleCost",
    "GemmCost",
    "EnergyLedger",
    "load_profile",
    "Profile",
    "list_profiles",
    "detect_meter",
    "Meter",
    "RaplMeter",
    "NvmlMeter",
    "ZeusMeter",
    "MeasurementWindow",
    "bitops",
    "calibrate",
    "price_step",
    "PricedStep",
    "TrafficCounter",
    "TrafficBook",
    "StepTraffic",
    "input_signature",
]


def __getattr__(name: str):
    # MacCounter is the engine's op recognition in counting-only mode; imported lazily (energy sits below the engine)
    if name == "MacCounter":
        from adaprec.engine.counter import MacCounter

        return MacCounter
    raise AttributeError(name)
