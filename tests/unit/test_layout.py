"""The header's layouts as loader.layout reads them: the bulk packer agrees with cffi."""

from __future__ import annotations

import pytest

from loader import layout


@pytest.mark.parametrize(("ctype", "names", "values"), [
    ("struct lb_backend", ("addr", "port", "proto", "flags", "group_id"),
     (0x0A00_0001, 0x1F90, 6, 3, 77)),
    ("struct lb_svc_val", ("svc_id", "maglev_off", "maglev_size", "affinity_timeout",
                           "backend_count", "flags", "group_id"),
     (5, 1 << 20, 1021, 10800, 10, 0x41, 9)),
])
def test_a_packed_entry_is_the_bytes_cffi_lays_out(ctype: str, names: tuple[str, ...],
                                                    values: tuple[int, ...]) -> None:
    packer = layout.packer(ctype, names)
    obj = layout.new(ctype, **dict(zip(names, values, strict=True)))
    assert packer.size == layout.sizeof(ctype)
    assert packer.pack(*values) == layout.to_bytes(obj)
    assert packer.unpack(layout.to_bytes(obj)) == values


def test_fields_named_out_of_order_are_refused() -> None:
    with pytest.raises(TypeError, match="struct lb_backend has fields"):
        layout.packer("struct lb_backend", ("port", "addr", "proto", "flags", "group_id"))
    with pytest.raises(TypeError):
        layout.packer("struct lb_backend", ("addr", "port", "proto", "flags"))
