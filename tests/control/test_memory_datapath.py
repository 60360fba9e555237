"""MemoryDatapath itself: the same interface as the real Datapath, and the map
semantics the control-plane tests rely on."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from equilibriumd.datapath import constants
from equilibriumd.datapath.libbpf import BpfError
from equilibriumd.datapath.maps import Datapath
from equilibriumd.datapath.memory import DatapathLike, MemoryDatapath, Write
from equilibriumd.datapath.slots import pack
from equilibriumd.datapath.structs import Svc
from equilibriumd.types import Addr


def public(cls: type) -> dict[str, object]:
    return {n: v for n, v in vars(cls).items() if not n.startswith("_") or n in ("__enter__", "__exit__")}


def test_same_methods_and_parameters_as_the_real_one():
    real = public(Datapath)
    assert set(real) - {"__init__"} <= set(public(DatapathLike)), "DatapathLike lags behind Datapath"
    for name, fn in real.items():
        if name == "__init__":
            continue
        mine = getattr(MemoryDatapath, name)
        assert list(inspect.signature(mine).parameters.values()) == \
            list(inspect.signature(fn).parameters.values()), name


def test_array_maps_read_zero_until_written_and_refuse_keys_past_the_end():
    dp = MemoryDatapath()
    assert dp.service(7).gen == 0 and dp.name(7) == "" and dp.read_shares(7, 1, [3]) == [0]
    assert (dp.read_slots(5, 1) == 0).all()          # an unwritten half names backend 0, as in the kernel
    assert dp.active(4).tolist() == [0, 0, 0, 0]
    with pytest.raises(BpfError):
        dp.set_service(constants.MAX_SERVICES, Svc())
    with pytest.raises(BpfError, match="wrote 1 of 2"):
        dp.write_tables(np.array([0, constants.MAX_SERVICES * 2]), pack(np.full((2, constants.SLOTS), 5)))
    assert dp.read_shares(0, 0, [5]) == [constants.SLOTS]   # a batch stops at the bad key
    with pytest.raises(ValueError):
        dp.write_slots(0, 0, np.zeros(3, dtype=np.uint32))
    with pytest.raises(BpfError):
        dp.active(constants.MAX_BACKENDS + 1)
    with pytest.raises(ValueError):
        dp.set_name(0, "x" * 65)                         # struct eq_svc_name holds 64 bytes


def test_each_call_is_one_recorded_write():
    dp = MemoryDatapath()
    dp.write_tables(np.array([4, 7]), np.zeros((2, constants.SLOTS), dtype=np.uint32))
    dp.set_services_batch(np.array([2, 3]), np.array([[1, 2, 3, 0], [0, 1, 1, 1]]))
    dp.write_tables(np.array([], dtype=np.int64), np.zeros((0, constants.SLOTS)))   # nothing: no syscall
    dp.set_frontend(Addr(6, "fd00::1", 443), "tcp", 2)
    dp.delete_frontend(Addr(4, "10.0.0.1", 80), "udp")     # absent: still one delete
    assert dp.writes == [Write("eq_lb_slots", "update_batch", (4, 7)), Write("eq_lb_svc", "update_batch", (2, 3)),
                         Write("eq_lb6_fe", "update", ((Addr(6, "fd00::1", 443), "tcp"),)),
                         Write("eq_lb4_fe", "delete", ((Addr(4, "10.0.0.1", 80), "udp"),))]
    assert dp.writes[1].values == ((1, 2, 3, 0), (0, 1, 1, 1))
    assert (dp.service(3).gen, dp.service(3).flags) == (0, 1)
    assert dp.frontends() == {2: (Addr(6, "fd00::1", 443), "tcp")}


def test_per_cpu_counters_sum_and_wrap_like_the_kernel():
    dp = MemoryDatapath(ncpu=4)
    reader = dp.telemetry()
    dp.add_telemetry(3, cpu=0, requests=(1 << 64) - 2)
    reader.tick(None, 8)
    dp.add_telemetry(3, cpu=3, requests=5, resp_2xx=7, req_hist={2: 7})
    dp.add_telemetry(3, cpu=0, requests=4)                       # cpu 0 wraps past 2^64
    d = reader.tick(None, 8)
    assert d["requests"][3] == 9 and d.req_timed[3] == 7         # responses: every one timed
    c, conn_hist, req_hist = reader.totals(8)
    assert c[3, 11] == 7 and req_hist[3, 2] == 7 and conn_hist.sum() == 0   # 2^64 - 2 + 9, mod 2^64
    dp.add_selections(2, 4, cpu=1)
    dp.add_selections(2, 1, cpu=2)
    assert dp.selections(4).tolist() == [0, 0, 5, 0]
    dp.reset_backend_stats(2)
    dp.reset_backend_stats(3)
    assert dp.selections(4).tolist() == [0, 0, 0, 0] and reader.totals(4)[0].sum() == 0
    dp.add_service_errors(1, cpu=2, stale_slot=3)
    assert dp.service_errors(2).tolist() == [[0, 0, 0], [0, 3, 0]]


def test_closed_like_the_real_one():
    with MemoryDatapath() as dp:
        dp.set_active(1, -2)
        assert dp.active(2).tolist() == [0, 0]           # clamped at 0, as Datapath.active
    with pytest.raises(KeyError):
        dp.services()
