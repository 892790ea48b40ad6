"""Conntrack lifetimes by state, with lifetimes shortened at compile time
(the same -D defines a node may set)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lb.datapath.instance import SMALL
from lb.inspect import packets
from loader import layout, libbpf
from loader.build import BuildOptions, Datapath, remove_pins
from tests.conftest import new_pin_dir, require_root
from tests.packet.test_datapath import TC, VIP, program, web

SHORT = {"LB_CT_TCP_SYN_S": "1", "LB_CT_TCP_CLOSING_S": "1", "LB_CT_OTHER_LIFETIME_S": "1",
         "LB_CT_TCP_LIFETIME_S": "30"}


@pytest.fixture
def short_ct() -> Iterator[Datapath]:
    require_root()
    pin_dir = new_pin_dir("ct")
    try:
        with Datapath(BuildOptions(pin_dir, SMALL, SHORT)) as dp:
            program(dp, web(["10.244.1.10"]))
            yield dp
    finally:
        remove_pins(pin_dir)


def reason_of(dp: Datapath, frame: bytes) -> str:
    stats = dp.map("lb_stats")

    def counts() -> list[int]:
        return [sum(s.packets for s in stats.lookup(i)) for i in range(8)]

    before = counts()
    libbpf.prog_test_run(dp.prog_fd(TC), frame)
    after = counts()
    moved = [i for i in range(8) if after[i] > before[i]]
    names = {layout.const("LB_STAT_DNAT_NEW"): "new",
             layout.const("LB_STAT_DNAT_ESTABLISHED"): "established",
             layout.const("LB_STAT_REVNAT"): "reverse"}
    return names.get(moved[0], str(moved)) if moved else "none"


def syn(sport: int, flags: str = "S") -> bytes:
    return packets.build("10.244.1.5", sport, VIP, 80, flags=flags)


def answer(sport: int, flags: str = "SA") -> bytes:
    return packets.build("10.244.1.10", 8080, "10.244.1.5", sport, flags=flags)


def test_unanswered_tcp_expires_soon_answered_lives_on(short_ct: Datapath) -> None:
    assert reason_of(short_ct, syn(50001)) == "new"
    assert reason_of(short_ct, syn(50002)) == "new"
    assert reason_of(short_ct, answer(50002)) == "reverse"
    time.sleep(1.3)
    assert reason_of(short_ct, syn(50001, "A")) == "new", "a half-open flow is gone"
    assert reason_of(short_ct, syn(50002, "A")) == "established", "an answered one stays"


def test_closed_tcp_expires_soon(short_ct: Datapath) -> None:
    assert reason_of(short_ct, syn(50003)) == "new"
    assert reason_of(short_ct, answer(50003)) == "reverse"
    assert reason_of(short_ct, syn(50003, "FA")) == "established"
    time.sleep(1.3)
    assert reason_of(short_ct, syn(50003, "A")) == "new"


def test_udp_expires_after_silence(short_ct: Datapath) -> None:
    frame = packets.build("10.244.1.5", 50004, VIP, 53, "udp")
    assert reason_of(short_ct, frame) == "new"
    assert reason_of(short_ct, frame) == "established"
    time.sleep(1.3)
    assert reason_of(short_ct, frame) == "new"


def test_flags_record_the_flow_state(short_ct: Datapath) -> None:
    reason_of(short_ct, syn(50005))
    reason_of(short_ct, answer(50005))
    ct = short_ct.map("lb_ct")
    flags = {k.dir: v.flags for k, v in ct.items()
             if 50005 in (socket.ntohs(k.sport), socket.ntohs(k.dport))}
    seen = layout.const("LB_CT_SEEN_REPLY")
    assert flags[layout.const("LB_CT_FORWARD")] & seen
    assert flags[layout.const("LB_CT_REPLY")] & seen


def test_a_syn_ack_on_a_closed_flows_reply_entry_is_not_reverse_translated(
        kernel_or_twin: Any) -> None:
    """The node's own socket may reuse the port a masqueraded flow had: the
    backend's SYN-ACK to it must reach that socket as it is."""
    from tests.packet.test_datapath import XDP

    dp = kernel_or_twin
    program(dp, web(["10.244.1.10"]))
    out = dp.run(XDP, packets.build("198.51.100.10", 43000, "192.0.2.1", 30080))
    fwd = packets.parse(out.data)
    assert fwd is not None and fwd.src == "192.0.2.1"
    masq = fwd.sport
    reply = packets.build("10.244.1.10", 8080, "192.0.2.1", masq, flags="SA")
    assert packets.parse(dp.run(XDP, reply).data).src == "192.0.2.1"  # type: ignore[union-attr]
    # Both sides close.
    dp.run(XDP, packets.build("198.51.100.10", 43000, "192.0.2.1", 30080, flags="FA"))
    dp.run(XDP, packets.build("10.244.1.10", 8080, "192.0.2.1", masq, flags="FA"))
    # A new connection of the node's own on that port: its SYN-ACK passes
    # untouched, and so does the rest of it (the node's socket would never
    # see its data otherwise, the client would get it instead).
    syn_ack = packets.build("10.244.1.10", 8080, "192.0.2.1", masq, flags="SA")
    assert dp.run(XDP, syn_ack).data == syn_ack
    assert dp.run(TC, syn_ack).data == syn_ack
    data = packets.build("10.244.1.10", 8080, "192.0.2.1", masq, flags="PA",
                         payload=b"HTTP/1.1 200")
    assert dp.run(TC, data).data == data
    assert dp.run(XDP, data).data == data
    reply_key = {k: v for k, v in dp.map("lb_ct").items()
                 if k.dir == layout.const("LB_CT_REPLY") and socket.ntohs(k.dport) == masq}
    assert [v.flags for v in reply_key.values()] == [
        layout.const("LB_CT_NODE_SOCKET") | layout.const("LB_CT_SEEN_REPLY")]
    # While that connection lives, a new masqueraded flow of the same client
    # port is given another port, not the node's.
    again = packets.parse(dp.run(XDP, packets.build(
        "198.51.100.10", 43000, "192.0.2.1", 30080)).data)
    assert again is not None and again.src == "192.0.2.1" and again.sport != masq
