"""What this device runs natively and how fast: the formats policies may choose here.

>>> from adaprec.hardware import probe
>>> report = probe()                 # cpu; measured once, then cached
>>> report.fast_formats()            # e.g. ('int8', 'bf16', 'fp32')
>>> report.fast_formats("attention") # measured apart: e.g. ('fp32',) where bf16 SDPA does not pay
>>> print(report.table())
>>> table = measure_gemms(linear_gemms(4096, 384, 1536), ("int8", "bf16"), report=report)
>>> formats_that_pay(table, linear_gemms(4096, 384, 1536), report.fast_formats())  # per shape, casts included

Nothing is hard-coded: flags (``/proc/cpuinfo``, CUDA compute capability)
say what the silicon claims, and a short sweep runs each kernel, checks its
answers and times it against fp32, per op class (GEMM, conv, attention). See
docs/hardware.md.
"""

from adaprec.hardware.flags import (
    FORMATS,
    cpu_conditional_formats,
    cpu_native_formats,
    cuda_native_formats,
    read_cpu_info,
)
from adaprec.hardware.probing import clear_memo, probe, resolve_device
from adaprec.hardware.report import FAST_MARGIN, DeviceReport, FormatSupport, HardwareError
from adaprec.hardware.shapes import (
    PAY_MARGIN,
    GemmShape,
    ShapeTable,
    formats_by_module,
    formats_that_pay,
    linear_gemms,
    measure_gemms,
    pays,
)

__all__ = [
    "FAST_MARGIN",
    "FORMATS",
    "DeviceReport",
    "FormatSupport",
    "GemmShape",
    "HardwareError",
    "PAY_MARGIN",
    "ShapeTable",
    "clear_memo",
    "cpu_conditional_formats",
    "cpu_native_formats",
    "cuda_native_formats",
    "formats_by_module",
    "formats_that_pay",
    "linear_gemms",
    "measure_gemms",
    "pays",
    "probe",
    "read_cpu_info",
    "resolve_device",
]
