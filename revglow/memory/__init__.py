"""Measuring memory: `revglow profile` and the batch planner (`profile.py`), the device meters, the convolution
workspaces and the fresh-process measurement of a training step."""
