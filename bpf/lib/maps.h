/* Every map of the datapath, pinned under LB_PIN_DIR so that a restarted
 * agent (and `lbctl maps` in another process) finds the same state. */
#ifndef LB_MAPS_DEF_H
#define LB_MAPS_DEF_H

#include "../lb_maps.h"
#include "common.h"

BPF_TABLE_PINNED("array", __u32, struct lb_meta, lb_meta, 1,
		 LB_PIN_DIR "/lb_meta");
BPF_TABLE_PINNED("hash", struct lb_svc_key, struct lb_svc_val, lb_services,
		 LB_MAX_SERVICES, LB_PIN_DIR "/lb_services");
/* Backend id -> address. Id 0 is never used; a zero address marks a free id. */
BPF_TABLE_PINNED("array", __u32, struct lb_backend, lb_backends,
		 LB_MAX_BACKENDS, LB_PIN_DIR "/lb_backends");
/* One flat slab of Maglev slots (backend ids); each service entry owns the
 * range [maglev_off, maglev_off + maglev_size), as Katran's ch_rings does.
 * Mappable: the agent writes a new range as plain stores, no syscall per slot. */
BPF_TABLE_PINNED("array", __u32, __u32, lb_maglev, LB_MAGLEV_SLOTS,
		 LB_PIN_DIR "/lb_maglev", BPF_F_MMAPABLE);
BPF_TABLE_PINNED("array", __u32, struct lb_rev_nat, lb_rev_nat,
		 LB_MAX_SERVICES, LB_PIN_DIR "/lb_rev_nat");
BPF_TABLE_PINNED("lru_hash", struct lb_ct_key, struct lb_ct_val, lb_ct,
		 LB_CT_SIZE, LB_PIN_DIR "/lb_ct");
BPF_TABLE_PINNED("lru_hash", struct lb_affinity_key, struct lb_affinity_val,
		 lb_affinity, LB_AFFINITY_SIZE, LB_PIN_DIR "/lb_affinity");
BPF_TABLE_PINNED("percpu_array", __u32, struct lb_stat, lb_stats,
		 LB_STAT_MAX, LB_PIN_DIR "/lb_stats");
BPF_TABLE_PINNED("lru_hash", struct lb_sock_rev_key, struct lb_sock_rev_val,
		 lb_sock_rev, LB_AFFINITY_SIZE, LB_PIN_DIR "/lb_sock_rev");
BPF_TABLE_PINNED("lru_hash", struct lb_frag_key, struct lb_frag_val, lb_frags,
		 LB_FRAG_SIZE, LB_PIN_DIR "/lb_frags");
/* NetworkPolicy (see lb_maps.h and lib/policy.h). */
BPF_TABLE_PINNED("hash", __u32, struct lb_pol_endpoint, lb_pol_endpoints,
		 LB_POL_MAX_ENDPOINTS, LB_PIN_DIR "/lb_pol_endpoints");
BPF_TABLE_PINNED("lpm_trie", struct lb_lpm4_key, struct lb_pol_peer, lb_pol_ipcache,
		 LB_POL_IPCACHE_SIZE, LB_PIN_DIR "/lb_pol_ipcache", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct lb_pol_rule_key, __u32, lb_pol_rules,
		 LB_POL_RULES_SIZE, LB_PIN_DIR "/lb_pol_rules");
BPF_TABLE_PINNED("array", __u32, struct lb_pol_portset, lb_pol_portsets,
		 LB_POL_PORTSETS, LB_PIN_DIR "/lb_pol_portsets");
BPF_TABLE_PINNED("percpu_array", __u32, struct lb_stat, lb_pol_drops,
		 LB_POL_PORTSETS, LB_PIN_DIR "/lb_pol_drops");
BPF_TABLE_PINNED("array", __u32, struct lb_config, lb_config, 1,
		 LB_PIN_DIR "/lb_config");
BPF_TABLE_PINNED("array", __u32, __u64, lb_filter, LB_FILTER_WORDS,
		 LB_PIN_DIR "/lb_filter");
BPF_TABLE_PINNED("array", __u32, __u64, lb_pol_filter, LB_FILTER_WORDS,
		 LB_PIN_DIR "/lb_pol_filter");
/* ClusterIPs that exist: a packet to one on a port no service has is
 * rejected, as kube-proxy does. */
BPF_TABLE_PINNED("hash", __u32, __u32, lb_vips, LB_MAX_SERVICES,
		 LB_PIN_DIR "/lb_vips");
/* Service CIDRs: an address there that no service holds is dropped. */
BPF_TABLE_PINNED("lpm_trie", struct lb_lpm4_key, __u32, lb_svc_cidrs, 16,
		 LB_PIN_DIR "/lb_svc_cidrs", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct lb_src_range_key, __u32, lb_source_ranges,
		 LB_MAX_SOURCE_RANGES, LB_PIN_DIR "/lb_source_ranges",
		 BPF_F_NO_PREALLOC);

/* The lookups every program makes the same way. */

/* lb_config's one entry; 0 while the agent has not written it. */
LB_INLINE struct lb_config *lb_cfg(void)
{
	__u32 zero = 0;

	return lb_config.lookup(&zero);
}

/* The frontend a reverse-NAT id stands for; 0 once it is gone (the agent
 * zeroes its entry). */
LB_INLINE struct lb_rev_nat *lb_frontend(__u32 svc_id)
{
	struct lb_rev_nat *rn = lb_rev_nat.lookup(&svc_id);

	return rn && rn->addr ? rn : 0;
}

#endif
