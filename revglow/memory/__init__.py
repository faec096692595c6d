"""Measuring memory: `revglow profile` (`profile.py`, measuring the workloads of `workload.py`), the tensor-by-tensor
count (`live_storage.py`), the batch planner (`planner.py`), the device meters, the convolution workspaces and the
fresh-process measurement of a training step."""
