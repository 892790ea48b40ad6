"""Network-namespace lab: a fake node with pods, an outside client and test servers on one machine.
It is the test bed and the demo (``lab.demo``), not the agent: the image does not ship it.

``lab.topology`` builds the namespaces, ``lab.servers`` holds the backends run inside
them and ``lab.clients`` the client helpers used by end-to-end tests, the demo and benchmarks.
"""
