"""Hardware energy counters: measured joules where the machine can give them.

* NVML (``nvidia-ml-py``): the GPU's total-energy counter (millijoules since the driver
  loaded), for work that runs on an NVIDIA GPU (a local model offloaded to it).
* RAPL (Linux powercap, ``/sys/class/powercap/intel-rapl:N/energy_uj``): the CPU packages'
  counters (AMD's Zen exposes the same interface), where the file is readable (often root
  only since CVE-2020-8694).
* Otherwise no counter: the work is charged from its CPU time (``milliwatt.energy``).

A counter measures the whole chip, so the reading between two points includes anything else
that ran on it meanwhile. milliwatt reads it around work that holds its tier's lock (one
decode at a time), which bounds what it charges to what ran in that window; on a busy shared
machine the reading is an upper bound. The method is recorded per attempt (``meter``).
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .redaction import get_logger

log = get_logger("milliwatt.meters")

POWERCAP = Path("/sys/class/powercap")


@dataclass
class Reading:
    """Joules measured over a block (None: the counter could not be read at one end)."""

    joules: float | None = None


class Meter:
    """A monotonic energy counter, read before and after a block of work."""

    name = "meter"

    def snapshot(self) -> tuple[int, ...]:
        """The counter's raw values now (raises ``OSError`` when unreadable)."""
        raise NotImplementedError

    def joules(self, start: tuple[int, ...], end: tuple[int, ...]) -> float:
        raise NotImplementedError

    @contextmanager
    def measure(self) -> Iterator[Reading]:
        """``with meter.measure() as r: work()`` then ``r.joules`` (None: a read failed, and
        the work is charged from its CPU time)."""
        reading = Reading()
        try:
            start = self.snapshot()
        except (OSError, ValueError) as e:
            log.warning("%s counter unreadable (%s): charging CPU time", self.name, e)
            yield reading
            return
        yield reading
        try:
            reading.joules = self.joules(start, self.snapshot())
        except (OSError, ValueError) as e:
            log.warning("%s counter unreadable (%s): charging CPU time", self.name, e)


class RaplMeter(Meter):
    """The package zones of Linux powercap (``intel-rapl:N``, not their subzones), summed."""

    name = "rapl"

    def __init__(self, zones: list[Path]) -> None:
        if not zones:
            raise ValueError("no RAPL package zone")
        self.zones = zones
        # Each zone's counter wraps at its own max_energy_range_uj.
        self.ranges = [_read_int(z / "max_energy_range_uj", default=0) for z in zones]

    @classmethod
    def find(cls, root: Path = POWERCAP) -> RaplMeter | None:
        """The machine's RAPL meter, or None when there is no readable package counter."""
        zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
        readable = [z for z in zones if os.access(z / "energy_uj", os.R_OK)]
        if not readable:
            return None
        try:
            meter = cls(readable)
            meter.snapshot()
        except (OSError, ValueError) as e:
            log.info("RAPL present but unreadable (%s)", e)
            return None
        return meter

    def snapshot(self) -> tuple[int, ...]:
        return tuple(_read_int(z / "energy_uj") for z in self.zones)

    def joules(self, start: tuple[int, ...], end: tuple[int, ...]) -> float:
        uj = sum(b - a if b >= a else b + wrap - a for a, b, wrap in zip(start, end, self.ranges))
        return uj / 1e6


class NvmlMeter(Meter):
    """NVML's total-energy counter of the GPUs in use (Volta and later), summed."""

    name = "nvml"

    def __init__(self, devices: list[int] | None = None) -> None:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        indices = devices if devices is not None else list(range(pynvml.nvmlDeviceGetCount()))
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        self._energy: Callable[[object], int] = pynvml.nvmlDeviceGetTotalEnergyConsumption
        if not self._handles:
            raise ValueError("no NVIDIA GPU")

    @classmethod
    def find(cls) -> NvmlMeter | None:
        try:
            meter = cls()
            meter.snapshot()
        except Exception as e:  # noqa: BLE001 - no package, driver, GPU or counter: no NVML meter
            log.info("no NVML energy counter (%s: %s)", type(e).__name__, e)
            return None
        return meter

    def snapshot(self) -> tuple[int, ...]:
        try:
            return tuple(int(self._energy(h)) for h in self._handles)  # millijoules
        except Exception as e:  # noqa: BLE001 - pynvml raises NVMLError, not an OSError
            raise OSError(str(e)) from None

    def joules(self, start: tuple[int, ...], end: tuple[int, ...]) -> float:
        return sum(max(b - a, 0) for a, b in zip(start, end)) / 1000.0


def pick(kind: str, *, gpu: bool, root: Path = POWERCAP) -> Meter | None:
    """The meter for local work: ``auto`` (NVML when the work runs on an NVIDIA GPU, else RAPL
    where readable, else none: CPU time), ``cpu-time`` (none), or one named counter, which
    must be readable (a ``ConfigError`` naming ``energy.meter`` says why not)."""
    if kind == "cpu-time":
        return None
    if kind == "nvml" or (kind == "auto" and gpu):
        meter: Meter | None = NvmlMeter.find()
        if meter is not None or kind == "auto":
            return meter or RaplMeter.find(root)
        raise ConfigError("energy.meter", "nvml: no NVIDIA GPU with an energy counter (is nvidia-ml-py installed, the driver loaded?)")
    meter = RaplMeter.find(root)
    if meter is None and kind == "rapl":
        raise ConfigError("energy.meter", f"rapl: no readable package counter under {root} (energy_uj is often root-only)")
    return meter


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@functools.lru_cache(maxsize=1)
def hardware() -> str:
    """The machine in a few words, for the ledger: architecture, CPU model, vCPUs."""
    return f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} vCPU"


def _read_int(path: Path, default: int | None = None) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        if default is not None:
            return default
        raise
