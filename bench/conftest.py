"""Benchmark settings: name the device in the saved JSON (pytest --benchmark-json=...)."""

from __future__ import annotations

import platform

import torch


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
