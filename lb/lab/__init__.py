"""Network-namespace lab: a fake node with pods, an outside client and test servers on one machine.

``lb.lab.topology`` builds the namespaces, ``lb.lab.servers`` holds the backends run inside
them and ``lb.lab.clients`` the client helpers used by end-to-end tests, the demo and benchmarks.
"""
