"""kube-proxy's rule sets for a list of services, in its own layouts: the baselines.

iptables mode (what `iptables-save` shows on a kube-proxy node): the nat table sends every
packet of a new connection through KUBE-SERVICES, one rule per service port, to a
KUBE-SVC-<hash> chain that picks an endpoint with `-m statistic --mode random --probability`
and jumps to a KUBE-SEP-<hash> chain that DNATs; NodePorts hang off the last rule of
KUBE-SERVICES (`addrtype --dst-type LOCAL` -> KUBE-NODEPORTS -> KUBE-EXT-<hash>), masquerade is
a mark (KUBE-MARK-MASQ) acted on in KUBE-POSTROUTING. The filter table gets KUBE-FORWARD and
the (here empty) reject/firewall chains. Chain names are kube-proxy's: the first 16
characters of base32(sha256(...)) of the service port name, protocol and endpoint. With more
than 1000 endpoints kube-proxy drops the per-endpoint comments ("large cluster mode"), and so
do these generators.

nftables mode: one `ip kube-proxy` table; the `services` chain looks the packet up in the
verdict map `service-ips` (ip . proto . port) and NodePorts in `service-nodeports`; each
service port has a chain picking an endpoint chain with `numgen random mod N vmap`.

Generated text is what kube-proxy feeds `iptables-restore --noflush` and `nft -f`. Only what
the benchmarks use is modelled: ClusterIP and NodePort services with the Cluster traffic
policies, TCP or UDP, every endpoint ready.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence

from bench.workload import CLUSTER_CIDR, SERVICE_CIDR, SvcSpec

MASQ_MARK = "0x4000"
# kube-proxy stops writing per-endpoint comments above this many endpoints.
LARGE_CLUSTER_ENDPOINTS = 1000


def _b32(text: str, length: int) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:length]


# -- iptables -------------------------------------------------------------------------------

def svc_chain(spec: SvcSpec) -> str:
    return "KUBE-SVC-" + _b32(spec.port_key + spec.protocol.lower(), 16)


def ext_chain(spec: SvcSpec) -> str:
    return "KUBE-EXT-" + _b32(spec.port_key + spec.protocol.lower(), 16)


def sep_chain(spec: SvcSpec, endpoint: str) -> str:
    ep = f"{endpoint}:{spec.target_port}"
    return "KUBE-SEP-" + _b32(spec.port_key + spec.protocol.lower() + ep, 16)


def _probability(n_left: int) -> str:
    return f"{1.0 / n_left:0.10f}"


def iptables_base() -> str:
    """The jumps from the built-in chains into kube-proxy's (it keeps them with `iptables -I`
    outside the restore); applied once before the service rules."""
    new = "-m conntrack --ctstate NEW"
    return "\n".join([
        "*filter",
        ":KUBE-PROXY-FIREWALL - [0:0]", ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-EXTERNAL-SERVICES - [0:0]", ":KUBE-FORWARD - [0:0]", ":KUBE-SERVICES - [0:0]",
        f'-A INPUT {new} -m comment --comment "kubernetes load balancer firewall" '
        "-j KUBE-PROXY-FIREWALL",
        '-A INPUT -m comment --comment "kubernetes health check service ports" '
        "-j KUBE-NODEPORTS",
        f'-A INPUT {new} -m comment --comment "kubernetes externally-visible service portals" '
        "-j KUBE-EXTERNAL-SERVICES",
        f'-A FORWARD {new} -m comment --comment "kubernetes load balancer firewall" '
        "-j KUBE-PROXY-FIREWALL",
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        f'-A FORWARD {new} -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        f'-A FORWARD {new} -m comment --comment "kubernetes externally-visible service '
        'portals" -j KUBE-EXTERNAL-SERVICES',
        f'-A OUTPUT {new} -m comment --comment "kubernetes load balancer firewall" '
        "-j KUBE-PROXY-FIREWALL",
        f'-A OUTPUT {new} -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "COMMIT",
        "*nat",
        ":KUBE-SERVICES - [0:0]", ":KUBE-POSTROUTING - [0:0]",
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" '
        "-j KUBE-POSTROUTING",
        "COMMIT",
        "",
    ])


def _filter_table() -> list[str]:
    return [
        "*filter",
        ":KUBE-NODEPORTS - [0:0]", ":KUBE-SERVICES - [0:0]", ":KUBE-EXTERNAL-SERVICES - [0:0]",
        ":KUBE-FORWARD - [0:0]", ":KUBE-PROXY-FIREWALL - [0:0]",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
        f"-m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
    ]


def _service_chains(spec: SvcSpec, large: bool, chains: list[str], rules: list[str]) -> None:
    """The KUBE-SVC / KUBE-EXT / KUBE-SEP chains of one service port."""
    proto = spec.protocol.lower()
    svc = svc_chain(spec)
    name = spec.port_key
    chains.append(f":{svc} - [0:0]")
    rules.append(f'-A {svc} -m comment --comment "{name} cluster IP" -m {proto} -p {proto} '
                 f"-d {spec.cluster_ip}/32 --dport {spec.port} ! -s {CLUSTER_CIDR} "
                 "-j KUBE-MARK-MASQ")
    n = len(spec.endpoints)
    for i, ep in enumerate(spec.endpoints):
        sep = sep_chain(spec, ep)
        stat = "" if i == n - 1 else \
            f" -m statistic --mode random --probability {_probability(n - i)}"
        rules.append(f'-A {svc} -m comment --comment "{name} -> {ep}:{spec.target_port}"'
                     f"{stat} -j {sep}")
    if spec.node_port:
        ext = ext_chain(spec)
        chains.append(f":{ext} - [0:0]")
        rules.append(f'-A {ext} -m comment --comment "masquerade traffic for {name} external '
                     'destinations" -j KUBE-MARK-MASQ')
        rules.append(f"-A {ext} -j {svc}")
    comment = "" if large else f" -m comment --comment {name}"
    for ep in spec.endpoints:
        sep = sep_chain(spec, ep)
        chains.append(f":{sep} - [0:0]")
        rules.append(f"-A {sep}{comment} -s {ep}/32 -j KUBE-MARK-MASQ")
        rules.append(f"-A {sep}{comment} -m {proto} -p {proto} -j DNAT "
                     f"--to-destination {ep}:{spec.target_port}")


def iptables_rules(specs: Sequence[SvcSpec], *, changed: Iterable[SvcSpec] | None = None,
                   deleted_chains: Iterable[str] = ()) -> str:
    """The `iptables-restore --noflush` input of one kube-proxy sync.

    `changed=None`: a full sync (every chain of every service). Otherwise a partial sync as
    kube-proxy >= 1.28 does it: the top-level chains (KUBE-SERVICES with one rule per service
    port, KUBE-NODEPORTS, ...) are always rewritten in full, the per-service chains only for
    the services in `changed`; `deleted_chains` are flushed and removed.
    KUBE-SERVICES keeps the order of `specs`, so the last spec's rule is matched last.
    """
    large = sum(len(s.endpoints) for s in specs) > LARGE_CLUSTER_ENDPOINTS
    write = {s.key for s in (specs if changed is None else changed)}
    chains = [":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]",
              ":KUBE-POSTROUTING - [0:0]", ":KUBE-MARK-MASQ - [0:0]"]
    rules = [
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}",
    ]
    for spec in specs:
        if not spec.endpoints:
            continue
        proto = spec.protocol.lower()
        rules.append(f'-A KUBE-SERVICES -m comment --comment "{spec.port_key} cluster IP" '
                     f"-m {proto} -p {proto} -d {spec.cluster_ip}/32 --dport {spec.port} "
                     f"-j {svc_chain(spec)}")
        if spec.node_port:
            rules.append(f"-A KUBE-NODEPORTS -m comment --comment {spec.port_key} -m {proto} "
                         f"-p {proto} --dport {spec.node_port} -j {ext_chain(spec)}")
        if spec.key in write:
            _service_chains(spec, large, chains, rules)
    rules.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: '
                 'this must be the last rule in this chain" -m addrtype --dst-type LOCAL '
                 "-j KUBE-NODEPORTS")
    for chain in deleted_chains:
        chains.append(f":{chain} - [0:0]")
        rules.append(f"-X {chain}")
    return "\n".join([*_filter_table(), "*nat", *chains, *rules, "COMMIT", ""])


def count_iptables_rules(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("-A "))


# -- nftables -------------------------------------------------------------------------------

TABLE = "ip kube-proxy"


def _nft_base(name: str) -> str:
    hashed = _b32(name, 8) + "-" + name
    # nft chain names are limited to 256 bytes; kube-proxy truncates the same way.
    return hashed if len(hashed) <= 200 else hashed[:197] + "..."


def nft_service_chain(spec: SvcSpec) -> str:
    return "service-" + _nft_base(f"{spec.key}/{spec.protocol.lower()}/{spec.port_name}")


def nft_external_chain(spec: SvcSpec) -> str:
    return "external-" + _nft_base(f"{spec.key}/{spec.protocol.lower()}/{spec.port_name}")


def nft_endpoint_chain(spec: SvcSpec, endpoint: str) -> str:
    return "endpoint-" + _nft_base(f"{spec.key}/{spec.protocol.lower()}/{spec.port_name}"
                                   f"__{endpoint}/{spec.target_port}")


def _nft_skeleton(node_ips: Sequence[str]) -> list[str]:
    t = TABLE
    lines = [
        f'add table {t} {{ comment "rules for kube-proxy" ; }}',
        f"add chain {t} mark-for-masquerade",
        f"add rule {t} mark-for-masquerade mark set mark or {MASQ_MARK}",
        f"add chain {t} masquerading",
        f"add rule {t} masquerading mark and {MASQ_MARK} == 0 return",
        f"add rule {t} masquerading mark set mark xor {MASQ_MARK}",
        f"add rule {t} masquerading masquerade fully-random",
        f'add set {t} cluster-ips {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}',
        f'add set {t} nodeport-ips {{ type ipv4_addr ; comment "IPs that accept NodePort '
        'traffic" ; }',
        f"add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : "
        'verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }',
        f"add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; "
        'comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }',
        f"add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; "
        'comment "destinations that are subject to LoadBalancerSourceRanges" ; }',
        f"add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; "
        'comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }',
        f"add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; "
        'comment "NodePort traffic" ; }',
        f"add chain {t} services",
        f"add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips",
        f"add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport "
        "vmap @service-nodeports",
        f"add chain {t} firewall-check",
        f"add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips",
        f"add chain {t} service-endpoints-check",
        f"add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport "
        "vmap @no-endpoint-services",
        f"add chain {t} nodeport-endpoints-check",
        f"add rule {t} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . "
        "th dport vmap @no-endpoint-nodeports",
        f"add chain {t} cluster-ips-check",
        f'add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic '
        'to invalid ports of ClusterIPs"',
        f"add rule {t} cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop comment "
        '"Drop traffic to unallocated ClusterIPs"',
        f'add chain {t} reject-chain {{ comment "helper for @no-endpoint-services / '
        '@no-endpoint-nodeports" ; }',
        f"add rule {t} reject-chain reject",
    ]
    hooks = [
        ("filter-prerouting", "filter hook prerouting priority -110",
         ["ct state new jump firewall-check"]),
        ("filter-input", "filter hook input priority -110",
         ["ct state new jump nodeport-endpoints-check",
          "ct state new jump service-endpoints-check"]),
        ("filter-forward", "filter hook forward priority -110",
         ["ct state new jump service-endpoints-check",
          "ct state new jump cluster-ips-check"]),
        ("filter-output", "filter hook output priority -110",
         ["ct state new jump service-endpoints-check", "ct state new jump firewall-check"]),
        ("filter-output-post-dnat", "filter hook output priority -90",
         ["ct state new jump cluster-ips-check"]),
        ("nat-prerouting", "nat hook prerouting priority -100", ["jump services"]),
        ("nat-output", "nat hook output priority -100", ["jump services"]),
        ("nat-postrouting", "nat hook postrouting priority 100", ["jump masquerading"]),
    ]
    for chain, hook, chain_rules in hooks:
        lines.append(f"add chain {t} {chain} {{ type {hook} ; }}")
        lines += [f"add rule {t} {chain} {r}" for r in chain_rules]
    if node_ips:
        lines.append(f"add element {t} nodeport-ips {{ {', '.join(node_ips)} }}")
    return lines


def _nft_service_rules(spec: SvcSpec) -> list[str]:
    """The chain that picks an endpoint for one service port (without its `add chain`)."""
    t = TABLE
    proto = spec.protocol.lower()
    chain = nft_service_chain(spec)
    vmap = " , ".join(f"{i} : goto {nft_endpoint_chain(spec, ep)}"
                      for i, ep in enumerate(spec.endpoints))
    return [
        f"add rule {t} {chain} ip daddr {spec.cluster_ip} {proto} dport {spec.port} "
        f"ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        f"add rule {t} {chain} numgen random mod {len(spec.endpoints)} vmap {{ {vmap} }}",
    ]


def _nft_endpoint(spec: SvcSpec, ep: str) -> list[str]:
    t = TABLE
    chain = nft_endpoint_chain(spec, ep)
    proto = spec.protocol.lower()
    return [f"add chain {t} {chain}",
            f"add rule {t} {chain} ip saddr {ep} jump mark-for-masquerade",
            f"add rule {t} {chain} meta l4proto {proto} dnat to {ep}:{spec.target_port}"]


def nft_ruleset(specs: Sequence[SvcSpec], node_ips: Sequence[str]) -> str:
    """The `nft -f` input of kube-proxy's first (full) sync."""
    t = TABLE
    lines = _nft_skeleton(node_ips)
    for spec in specs:
        if not spec.endpoints:
            continue
        proto = spec.protocol.lower()
        svc = nft_service_chain(spec)
        for ep in spec.endpoints:
            lines += _nft_endpoint(spec, ep)
        lines.append(f"add chain {t} {svc}")
        lines += _nft_service_rules(spec)
        lines.append(f"add element {t} cluster-ips {{ {spec.cluster_ip} }}")
        lines.append(f"add element {t} service-ips {{ {spec.cluster_ip} . {proto} . "
                     f"{spec.port} : goto {svc} }}")
        if spec.node_port:
            ext = nft_external_chain(spec)
            lines += [f"add chain {t} {ext}",
                      f"add rule {t} {ext} jump mark-for-masquerade",
                      f"add rule {t} {ext} goto {svc}",
                      f"add element {t} service-nodeports {{ {proto} . {spec.node_port} : "
                      f"goto {ext} }}"]
    return "\n".join([*lines, ""])


def nft_endpoint_change(old: SvcSpec, new: SvcSpec) -> str:
    """The transaction kube-proxy's nftables mode sends when a service's endpoints change:
    chains for new endpoints, the service chain flushed and rewritten, chains of endpoints
    that left flushed and deleted (kube-proxy defers that last part to a later sync)."""
    t = TABLE
    lines: list[str] = []
    gone = [ep for ep in old.endpoints if ep not in new.endpoints]
    for ep in new.endpoints:
        if ep not in old.endpoints:
            lines += _nft_endpoint(new, ep)
    lines.append(f"flush chain {t} {nft_service_chain(new)}")
    lines += _nft_service_rules(new)
    for ep in gone:
        chain = nft_endpoint_chain(old, ep)
        lines += [f"flush chain {t} {chain}", f"delete chain {t} {chain}"]
    return "\n".join([*lines, ""])


def count_nft_rules(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("add rule "))
