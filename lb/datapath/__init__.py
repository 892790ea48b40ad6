"""Access to the datapath: one instance's pins and writers (`instance`), the
interface the kernel and the userspace twin share (`interface`), attaching
programs to devices (`attach`) and cgroups (`socklb`), namespaces
(`netns`), and the twin itself (`userspace`). Building and loading the
programs and reading map layouts is `loader/`."""
