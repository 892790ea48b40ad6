"""The datapath in plain Python: in-memory maps with the kernel's semantics
and a packet processor that does what bpf/lb.c does, byte for byte. Used by
`lbctl trace --datapath userspace` (no root, no BPF) and as the reference
the kernel programs are differentially tested against."""
