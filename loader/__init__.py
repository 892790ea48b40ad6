"""Compile, load, pin and attach the datapath; reach its maps from Python."""
