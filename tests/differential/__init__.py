"""The kernel programs against the userspace datapath, packet by packet."""
