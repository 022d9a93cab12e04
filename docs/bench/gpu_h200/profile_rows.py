"""Whether summing every row of a CUDA profile counts kernels twice: one int8 Conv2d step
(r50_conv2 shape, batch 32) profiled, its rows summed three ways, against its wall time.
Usage: PYTHONPATH=src python docs/bench/gpu_h200/profile_rows.py cuda"""

import sys
import time

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fqtorch import FQTConfig, quantize_model

dev = sys.argv[1]
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
m = quantize_model(
    nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)).to(dev), FQTConfig(backend="int8")
)
x = torch.randn(32, 64, 56, 56, device=dev, requires_grad=True)
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)


def st():
    m(x).sum().backward()


for _ in range(3):
    st()
sync()
with profile(activities=acts) as p:
    for _ in range(2):
        st()
    sync()
ev = p.key_averages()


def s(f):
    return sum(e.self_device_time_total for e in ev if f(e)) / 2e3


t = time.perf_counter()
for _ in range(5):
    st()
sync()
print(
    "ms/step: all rows",
    s(lambda e: True),
    "op rows",
    s(lambda e: e.device_type == DeviceType.CPU),
    "kernel rows",
    s(lambda e: e.device_type == DeviceType.CUDA),
    "wall",
    (time.perf_counter() - t) / 5e-3,
)
