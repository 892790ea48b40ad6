/* Key and value layouts of every map the datapath shares with the control plane.
 *
 * This is the only place a layout is written. The BPF programs include it; the
 * Python side feeds the same text to cffi's cdef(). Keep it plain: fixed-width
 * __uN types, explicit padding, integer #defines, no includes, no #if.
 * Addresses and ports are stored in network byte order, exactly as they sit
 * in the packet, so the fast path never swaps bytes.
 *
 * Any change to a struct below must bump LB_LAYOUT_VERSION: an agent refuses
 * pinned maps written with another layout.
 */

#define LB_LAYOUT_VERSION 6

/* Service scope: external traffic (XDP on the node device) and traffic from
 * local pods (tc on their veth) may see different backend sets when a traffic
 * policy is Local, so a frontend has one entry per scope. */
#define LB_SCOPE_EXTERNAL 0
#define LB_SCOPE_INTERNAL 1

/* lb_svc_val.flags */
#define LB_SVC_CLUSTER_IP     0x0001
#define LB_SVC_NODE_PORT      0x0002
#define LB_SVC_EXTERNAL_IP    0x0004
#define LB_SVC_LOAD_BALANCER  0x0008
#define LB_SVC_AFFINITY       0x0010
#define LB_SVC_SOURCE_RANGES  0x0020
#define LB_SVC_MASQUERADE     0x0040
#define LB_SVC_LOCAL_ONLY     0x0080 /* Local policy, endpoints elsewhere: none here drops */

/* lb_backend.flags */
#define LB_BACKEND_LOCAL       0x01
#define LB_BACKEND_TERMINATING 0x02

/* lb_ct_key.dir */
#define LB_CT_FORWARD 0
#define LB_CT_REPLY   1
/* Connections NetworkPolicy allowed, one key space per check: the egress
 * check writes the flow under LB_CT_POLICY and its reply under
 * LB_CT_POLICY_INGRESS, the ingress check the other way round, so one
 * side's allow never stands in for the other side's check. */
#define LB_CT_POLICY         2
#define LB_CT_POLICY_INGRESS 3

/* lb_ct_val.flags */
#define LB_CT_MASQ      0x01 /* source rewritten too (masquerade or hairpin) */
#define LB_CT_SEEN_FIN  0x02
#define LB_CT_SEEN_RST  0x04
#define LB_CT_SEEN_REPLY 0x08
#define LB_CT_EXTERNAL  0x10 /* created from outside (LB_SCOPE_EXTERNAL) */
#define LB_CT_NODE_SOCKET 0x20 /* a reply 5-tuple a node's own connection took over */

#define LB_PROTO_TCP 6
#define LB_PROTO_UDP 17

/* Index of lb_stats: one counter per verdict reason. The verdict a reason
 * stands for is fixed (see lb/verdicts.py); trace reads the counter that moved. */
#define LB_STAT_PASS_NOT_IP        0
#define LB_STAT_PASS_NOT_SERVICE   1
#define LB_STAT_PASS_FRAGMENT      2
#define LB_STAT_PASS_OTHER_PROTO   3
#define LB_STAT_DNAT_NEW           4
#define LB_STAT_DNAT_ESTABLISHED   5
#define LB_STAT_REVNAT             6
#define LB_STAT_DROP_MALFORMED     7
#define LB_STAT_REJECT_NO_ENDPOINTS 8
#define LB_STAT_DROP_BACKEND_GONE  9
#define LB_STAT_DROP_SOURCE_RANGE  10
#define LB_STAT_DROP_NO_LOCAL      11
#define LB_STAT_REJECT_NO_PORT     12
#define LB_STAT_DROP_UNKNOWN_VIP   13
#define LB_STAT_DROP_POLICY        14
#define LB_STAT_PASS_POLICY        15
#define LB_STAT_ERROR              16
#define LB_STAT_DROP_MARTIAN       17 /* from outside with a source that cannot be */
#define LB_STAT_ICMP_ERROR_NAT     18 /* an ICMP error of a translated flow, translated */
#define LB_STAT_PASS_FRAG_NO_FIRST 19 /* a later fragment whose first was not seen here */
#define LB_STAT_REJECT_FRAG_NEEDED 20 /* translated, too big for its route: "fragmentation needed" sent */
#define LB_STAT_MAX                32

struct lb_svc_key {
	__u32 addr;          /* frontend IPv4, network order */
	__u16 port;          /* network order */
	__u8  proto;         /* IPPROTO_TCP / IPPROTO_UDP */
	__u8  scope;         /* LB_SCOPE_* */
};

struct lb_svc_val {
	__u32 svc_id;        /* reverse-NAT index of this frontend */
	__u32 maglev_off;    /* first slot of this entry's range in lb_maglev */
	__u32 maglev_size;   /* prime; 0 when the service has no endpoints */
	__u32 affinity_timeout; /* seconds; used when LB_SVC_AFFINITY is set */
	__u16 backend_count;
	__u16 flags;         /* LB_SVC_* */
	__u32 group_id;      /* the service port: frontends of one port share
	                      * backend ids and client affinity */
};

struct lb_backend {
	__u32 addr;          /* network order */
	__u16 port;          /* network order */
	__u8  proto;
	__u8  flags;         /* LB_BACKEND_* */
	__u32 group_id;      /* owning service port (lb_svc_val.group_id) */
};

/* lb_rev_nat: svc_id -> the frontend a reply must appear to come from. */
struct lb_rev_nat {
	__u32 addr;
	__u16 port;
	__u16 pad;
};

struct lb_ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8  proto;
	__u8  dir;           /* LB_CT_FORWARD: client -> frontend; LB_CT_REPLY: backend -> client */
	__u16 pad;
};

struct lb_ct_val {
	__u64 created_ns;    /* lb_now() of the first packet (loader/clock.py reads
	                      * the same clock) */
	__u64 last_seen_ns;  /* refreshed at most once a second */
	__u32 backend_id;    /* forward entries */
	__u32 svc_id;        /* both directions */
	__u32 group_id;      /* the service port the backend was chosen in */
	__u32 nat_addr;      /* reply entries: original client when masqueraded */
	__u16 nat_port;
	__u8  flags;         /* LB_CT_* */
	__u8  pad;
};

/* A client's affinity is per service port and backend set: a frontend
 * under a Local traffic policy (LB_SVC_LOCAL_ONLY) picks among this node's
 * endpoints only, so its choices are kept apart from the whole set's, as
 * kube-proxy's local policy chain checks only its own endpoints' recent
 * sets. */
#define LB_AFFINITY_LOCAL_SET 0x80000000

struct lb_affinity_key {
	__u32 client;
	__u32 group_id; /* | LB_AFFINITY_LOCAL_SET for the local subset */
};

struct lb_affinity_val {
	__u64 last_used_ns;
	__u32 backend_id;
	__u32 pad;
};

struct lb_stat {
	__u64 packets;
	__u64 bytes;
};

/* lb_config[0]: node-wide settings the agent writes. */
#define LB_MAX_NODE_IPS 8
/* Service CIDRs held in lb_config for the fast path; with more, every one
 * is looked up in lb_svc_cidrs instead (svc_cidrs_spill). */
#define LB_MAX_SVC_CIDRS 4

struct lb_config {
	__u32 node_ip;       /* masquerade source for external traffic */
	__u32 hairpin_ip;    /* source of a pod reaching itself via a service */
	__u64 netns_cookie;  /* the node's network namespace: socket hooks act there only */
	/* The node's own IPv4 addresses (0 unused): never a source from outside. */
	__u32 node_ips[LB_MAX_NODE_IPS];
	/* The service CIDRs (mask 0 unused), unless svc_cidrs_spill says they
	 * are more than fit. */
	__u32 svc_cidr_net[LB_MAX_SVC_CIDRS];
	__u32 svc_cidr_mask[LB_MAX_SVC_CIDRS];
	__u32 svc_cidrs_spill;
	/* The smallest MTU of the node's devices: a packet no longer fits every
	 * path out of the node, and only a longer one translated at XDP looks
	 * up its route's MTU (lib/pmtu.h). 0: no lookups. */
	__u32 min_mtu;
};

/* lb_filter: a Bloom filter with one hash over what can be service traffic,
 * consulted before any hash-map lookup so that the rest of a node's traffic
 * costs a few array reads (bpf/lib/filter.h). LB_FILTER_WORDS words of 64
 * bits (a power of two, sized from the other maps: loader/sizes.py);
 * bit lb_filter_bit(kind, addr, port) is set for every frontend's address and
 * port, every ClusterIP's address (port 0) and every backend's address and
 * port (replies come from there). A false positive costs the lookups the
 * filter saves; a false negative cannot happen while the agent sets a bit
 * before the entry it stands for is usable and clears it after. */
#define LB_FILTER_FRONTEND 0
#define LB_FILTER_VIP      1
#define LB_FILTER_BACKEND  2
/* lb_pol_filter, of the same size and hash, written by the policy writer:
 * the addresses of lb_pol_endpoints (port 0), set before the endpoint's
 * entry is written, so an isolated pod is never missed. */
#define LB_FILTER_POLICED  3

/* lb_sock_rev: a UDP socket's translated peer -> the service it asked for,
 * so replies read through recvmsg appear to come from the service. */
struct lb_sock_rev_key {
	__u64 cookie;        /* bpf_get_socket_cookie() */
	__u32 addr;
	__u16 port;
	__u16 pad;
};

struct lb_sock_rev_val {
	__u32 addr;
	__u16 port;
	__u16 pad;
};

/* lb_frags: the ports of a fragmented datagram, taken from its first
 * fragment, for the later ones, which carry no L4 header. Fragments of one
 * datagram share source, destination, IP id and protocol. */
#define LB_FRAG_SIZE 8192

struct lb_frag_key {
	__u32 saddr;
	__u32 daddr;
	__u16 id;
	__u8  proto;
	__u8  pad;
};

struct lb_frag_val {
	__u16 sport;
	__u16 dport;
};

/* LPM trie key over one IPv4 prefix (lb_svc_cidrs: the service CIDRs). */
struct lb_lpm4_key {
	__u32 prefixlen;
	__u32 addr;
};

/* LPM trie key of lb_source_ranges: a frontend's loadBalancerSourceRanges.
 * prefixlen counts svc_id's 32 bits plus the CIDR's. */
struct lb_src_range_key {
	__u32 prefixlen;
	__u32 svc_id;        /* network order, so the trie matches it bit by bit */
	__u32 addr;
};

/* lb_meta[0]: written by the agent when it creates the maps. */
struct lb_meta {
	__u32 layout_version;
	__u32 pad;
};

/* NetworkPolicy */

/* Checked on the first packet of a connection only, after service DNAT (the
 * policy sees the backend's address and port, never a VIP); later packets and
 * replies pass through conntrack. Egress is checked for a local pod as it
 * sends (tc ingress on its veth), ingress for a local pod as traffic enters it.
 * Built by lb/policy (compile, lookup: the reference of what the programs do).
 *
 * lb_pol_endpoints  hash          __u32 local pod IPv4 (network order)
 *                                 -> struct lb_pol_endpoint; only pods some
 *                                 policy isolates; no entry: allow
 * lb_pol_ipcache    lpm_trie      struct lb_lpm4_key (the remote address, 32)
 *                                 -> struct lb_pol_peer; no match: identity 0
 * lb_pol_rules      hash          struct lb_pol_rule_key -> __u32, the first
 *                                 lb_pol_portsets slot of what is allowed
 * lb_pol_portsets   array         __u32 slot -> struct lb_pol_portset; 0 unused
 * lb_pol_drops      percpu_array  __u32 policy id -> struct lb_stat
 *
 * An identity numbers a class of remote addresses that every policy of this
 * node treats alike (same selector peers matched, same ipBlocks containing
 * them, same named ports); the ipcache maps each pod /32 and each ipBlock
 * prefix to one, so a pod that comes or goes is one ipcache entry, not one
 * rule per local pod. Identity 0 is "no class": its rules are those with an
 * empty from/to, which every identity's entry includes too.
 *
 * Per new connection and direction (local = the pod checked, remote = the
 * other end; lb/policy/lookup.py:check is the reference):
 *   ep = lb_pol_endpoints[local]; none, or flag of dir clear: allow
 *   remote == local: allow (a pod reaching itself)
 *   peer = lb_pol_ipcache[{32, remote}]; identity = peer ? peer->identity : 0
 *   dir == ingress and peer->flags & LB_POL_PEER_HOST: allow
 *   slot = lb_pol_rules[{local, identity, dir}] ?: lb_pol_rules[{local, 0, dir}]
 *   follow slot/next (at most LB_POL_MAX_CHAIN): the first range with proto
 *   ANY or equal, and port_lo <= dport <= port_hi: allow, credit its policy
 *   otherwise drop; count it in lb_pol_drops[ep->{ingress,egress}_policy]
 */
#define LB_POL_INGRESS 0
#define LB_POL_EGRESS  1

/* lb_pol_endpoint.flags */
#define LB_POL_ISOLATED_INGRESS 0x01
#define LB_POL_ISOLATED_EGRESS  0x02

/* lb_pol_peer.flags: an address of this node (or its hairpin source);
 * ingress from it is always allowed, as the API requires for the pod's node. */
#define LB_POL_PEER_HOST 0x01

#define LB_POL_IDENTITY_ANY 0
/* lb_pol_port_range.proto: any protocol, every port (a rule without ports). */
#define LB_POL_PROTO_ANY 0
#define LB_POL_PORTS_PER_SET 8
/* Longest chain of lb_pol_portsets slots the programs follow. */
#define LB_POL_MAX_CHAIN 16

struct lb_pol_endpoint {
	__u32 ingress_policy; /* policy id blamed for an ingress drop */
	__u32 egress_policy;  /* policy id blamed for an egress drop */
	__u8  flags;          /* LB_POL_ISOLATED_* */
	__u8  pad[3];
};

struct lb_pol_peer {
	__u32 identity;
	__u32 flags;          /* LB_POL_PEER_* */
};

struct lb_pol_rule_key {
	__u32 ep_addr;        /* the local pod, network order */
	__u32 identity;       /* the remote end's; LB_POL_IDENTITY_ANY: fallback */
	__u8  dir;            /* LB_POL_INGRESS / LB_POL_EGRESS */
	__u8  pad[3];
};

/* Ports in HOST order, unlike everywhere else: they are compared as a range. */
struct lb_pol_port_range {
	__u16 port_lo;
	__u16 port_hi;
	__u8  proto;          /* IPPROTO_*, or LB_POL_PROTO_ANY */
	__u8  pad[3];
	__u32 policy;         /* id credited when this range allows */
};

/* Disjoint ranges; the first that matches decides. */
struct lb_pol_portset {
	__u32 count;          /* ranges in use */
	__u32 next;           /* slot continuing the set; 0: end */
	struct lb_pol_port_range ranges[LB_POL_PORTS_PER_SET];
};
