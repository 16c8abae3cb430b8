"""System metrics sampled by the tracker itself, so they are in metrics.jsonl (kept during a
tracking outage, uploaded later by `track sync`) and useful for short runs: a sample when the
run starts, every `interval_s` (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, default 10 s), and one
when it ends. CPU utilization is measured over the interval since the previous sample, so the
first sample has none (psutil's first reading is a meaningless 0.0).

Keys (MLflow's own names, so the UI's "System metrics" tab groups them): system/cpu_utilization_percentage,
system/system_memory_usage_megabytes, system/system_memory_usage_percentage,
system/process_rss_megabytes, and on CUDA system/gpu_0_memory_usage_megabytes (+ utilization
when NVML is available) for this process's device. Their step is the sample number.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

DEFAULT_INTERVAL_S = 10.0
MB = 2**20


class SystemSampler:
    def __init__(
        self, log: Callable[[dict[str, float], int], None], *, first_step: int = 0, interval_s: float | None = None
    ):
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        self._log = log
        self._step = first_step
        env = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
        self.interval_s = interval_s or (float(env) if env else DEFAULT_INTERVAL_S)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="llama-train-sysmetrics", daemon=True)
        psutil.cpu_percent(interval=None)  # starts the measuring interval of the next sample
        self._primed = False

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            self._log(self.read(), self._step)
            self._step += 1

    def read(self) -> dict[str, float]:
        vm = self._psutil.virtual_memory()
        out = {}
        cpu = self._psutil.cpu_percent(interval=None)
        if self._primed:
            out["system/cpu_utilization_percentage"] = cpu
        self._primed = True
        out |= {
            "system/system_memory_usage_megabytes": (vm.total - vm.available) / MB,
            "system/system_memory_usage_percentage": vm.percent,
            "system/process_rss_megabytes": self._proc.memory_info().rss / MB,
        }
        out.update(_gpu_metrics())
        return out

    def finish(self) -> None:
        """A last sample (so even a run shorter than the interval has two) and stop."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.sample()


def _gpu_metrics() -> dict[str, float]:
    """This process's GPU only, and only once it uses CUDA (querying other devices would create a
    CUDA context on each of them)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    i = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(i)
    out = {f"system/gpu_{i}_memory_usage_megabytes": (total - free) / MB}
    try:
        out[f"system/gpu_{i}_utilization_percentage"] = float(torch.cuda.utilization(i))
    except Exception:  # noqa: BLE001  (needs NVML, optional)
        pass
    return out
