"""Map sizes are agent flags: a live agent with room for three backends
refuses what does not fit (and says so) while what fits serves; pinned maps
keep their size, so a second agent asking for another one is refused with
the remedy named and nothing changed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import objects
from lab.agent import LabAgent
from lab.clients import curl_many
from lab.topology import LabError, Topology, TopologySpec
from tests.conftest import require_root

HTTP = objects.Port("http", 80, 8080)


@pytest.fixture
def topo() -> Iterator[Topology]:
    require_root()
    with Topology.build(TopologySpec.single(pods=3)) as t:
        for pod in t.pods[1:]:
            t.start_http(pod, 8080)
        yield t


def test_backend_room_is_a_flag_and_pins_keep_their_size(topo: Topology,
                                                           tmp_path: Path) -> None:
    client, b1, b2 = topo.pods
    eps = [(b1.ip, b1.node.name), (b2.ip, b2.node.name)]
    manifest = tmp_path / "two.yaml"
    objects.write(manifest, [
        objects.service("a", "10.96.0.11", [HTTP]), objects.endpoint_slice("a", [HTTP], eps),
        objects.service("b", "10.96.0.12", [HTTP]), objects.endpoint_slice("b", [HTTP], eps)])
    # Ids start at 1: room for 3 backends holds a's two, not b's as well.
    agent = LabAgent(topo, topo.node, [manifest], extra=("--max-backends", "4")).start()
    try:
        line = agent.wait_for("no room in lb_backends")
        assert "refused default/b" in line, line
        # The sync line counts what the maps hold, and says what was refused.
        synced = agent.wait_for("synced")
        assert "synced 1 of 2 frontends" in synced and "1 refused" in synced, synced
        assert "Argument list too long" not in "\n".join(agent.lines)
        assert set(curl_many(topo, client, "http://10.96.0.11/", 20)) == {b1.name, b2.name}
        assert agent.stop() == 0

        again = LabAgent(topo, topo.node, [manifest], instance=agent.instance,
                         extra=("--max-backends", "64"))
        with pytest.raises(LabError) as refused:
            again.start()
        text = "\n".join(again.lines)
        assert "max entries 4 != 64" in text and "lbctl down" in text, text
        assert "agent exited" in str(refused.value)
        # The pins were left alone: the first size still loads over them.
        agent = LabAgent(topo, topo.node, [manifest], instance=agent.instance,
                         extra=("--max-backends", "4")).start()
        assert set(curl_many(topo, client, "http://10.96.0.11/", 20)) == {b1.name, b2.name}
    finally:
        agent.down()
