"""Control plane of the eBPF/XDP service load balancer."""
