"""Looking into the datapath: `lbctl trace` (`trace`, over crafted
`packets`), and `lbctl maps` (`mapview`)."""
