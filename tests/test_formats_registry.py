"""Every field of the registered formats, checked against the published specs."""

from __future__ import annotations

import pytest
import torch

import adaprec
from adaprec.errors import FormatSpecError, UnknownFormatError
from adaprec.formats import get, names


def test_unknown_name_lists_known_formats() -> None:
    with pytest.raises(UnknownFormatError) as info:
        get("fp7_e9")
    msg = str(info.value)
    assert "fp7_e9" in msg
    for known in ("fp8_e4m3", "bf16", "int8", "fp4_e2m1"):
        assert known in msg
    assert isinstance(info.value, adaprec.AdaprecError)


def test_non_string_name_is_a_clear_error() -> None:
    with pytest.raises(UnknownFormatError, match="string"):
        get(8)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name, bits, e, m, bias, maxf, min_normal, min_sub, has_inf, has_nan, dtype",
    [
        ("fp8_e4m3", 8, 4, 3, 7, 448.0, 2.0**-6, 2.0**-9, False, True, torch.float8_e4m3fn),
        ("fp8_e5m2", 8, 5, 2, 15, 57344.0, 2.0**-14, 2.0**-16, True, True, torch.float8_e5m2),
        ("fp16", 16, 5, 10, 15, 65504.0, 2.0**-14, 2.0**-24, True, True, torch.float16),
        ("bf16", 16, 8, 7, 127, (2 - 2.0**-7) * 2.0**127, 2.0**-126, 2.0**-133, True, True, torch.bfloat16),
        ("fp6_e3m2", 6, 3, 2, 3, 28.0, 0.25, 0.0625, False, False, None),
        ("fp6_e2m3", 6, 2, 3, 1, 7.5, 1.0, 0.125, False, False, None),
        ("fp4_e2m1", 4, 2, 1, 1, 6.0, 1.0, 0.5, False, False, None),
    ],
)
def test_float_format_fields(name, bits, e, m, bias, maxf, min_normal, min_sub, has_inf, has_nan, dtype) -> None:
    f = get(name)
    assert (f.kind, f.bits, f.ebits, f.mbits, f.bias) == ("float", bits, e, m, bias)
    assert f.max_finite == maxf
    assert f.min_normal == min_normal
    assert f.min_subnormal == min_sub
    assert f.eps == 2.0**-m
    assert (f.has_inf, f.has_nan) == (has_inf, has_nan)
    assert f.torch_dtype == dtype


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"])
def test_fields_agree_with_torch_finfo(name: str) -> None:
    f = get(name)
    fi = torch.finfo(f.torch_dtype)
    assert f.max_finite == fi.max
    assert f.min_normal == fi.smallest_normal
    assert f.eps == fi.eps


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_int_formats(bits: int) -> None:
    f = get(f"int{bits}")
    assert f.kind == "int" and f.bits == bits
    assert f.qmax == 2 ** (bits - 1) - 1
    assert f.max_finite == f.qmax and f.scale == 1.0 and f.eps == 1.0
    assert not f.has_inf and not f.has_nan


def test_fixed_point_spelling() -> None:
    f = get("fixed8_4")
    assert f.scale == 2.0**-4 and f.qmax == 127 and f.max_finite == 127 / 16


def test_exmy_spelling_and_aliases() -> None:
    f = get("e3m4")
    assert (f.ebits, f.mbits, f.bias, f.has_inf) == (3, 4, 3, False)
    assert f.max_finite == 2.0**4 * (2 - 2.0**-4)
    assert get("E5M2") is get("fp8_e5m2")
    assert get("bfloat16") is get("bf16")
    assert "e3m4" in names()


@pytest.mark.parametrize("spec", ["e9m2", "e0m3", "e4m24", "int1", "int40"])
def test_impossible_widths_are_rejected(spec: str) -> None:
    with pytest.raises(FormatSpecError):
        get(spec)


def test_emax_and_qmax_guards() -> None:
    assert get("fp8_e4m3").emax == 8 and get("fp8_e5m2").emax == 15 and get("fp4_e2m1").emax == 2
    with pytest.raises(FormatSpecError):
        _ = get("int8").emax
    with pytest.raises(FormatSpecError):
        _ = get("bf16").qmax


def test_format_table_lists_every_format() -> None:
    from adaprec.formats import format_table

    for rich in (True, False):
        text = format_table(rich=rich)
        for n in names():
            assert n in text
        assert "448" in text and "57344" in text and "65504" in text
