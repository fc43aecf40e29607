"""How long installing milliwatt takes, remote-only versus everything (docs/benchmarks.md).

Each extra is installed from this checkout into a fresh virtual environment in a temporary
folder, as a user would: ``python -m venv``, then ``pip install '.[EXTRA]'`` (not editable),
with pip's own cache and indexes as this machine has them, so a wheel pip built or downloaded
before (llama-cpp-python's is the one that matters: it builds from source for ~13 minutes
when pip has no wheel) is reused, as it would be on a user's machine. For ``all`` the CPU
build of torch is installed first, as scripts/setup.sh does (otherwise pip picks a CUDA build
of several GB for sentence-transformers); its time is part of the figure.

Prints, per extra: the seconds, the packages installed, the size of the environment's
site-packages, and whether pip's cache held a llama-cpp-python wheel beforehand::

    python benchmarks/install_time.py                   # remote, then all
    python benchmarks/install_time.py --extras remote   # only the remote-only install
    python benchmarks/install_time.py --json install_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # as scripts/setup.sh pins it


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


def _size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def _cached_llama_wheel(python: str) -> list[str]:
    out = subprocess.run([python, "-m", "pip", "cache", "list", "llama_cpp_python*"], capture_output=True, text=True)
    return [line.strip(" -") for line in out.stdout.splitlines() if "llama_cpp_python" in line]


def measure(extra: str, base: Path, python: str) -> dict:
    venv = base / f"venv-{extra}"
    log = base / f"{extra}.log"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    empty = _size(_site_packages(venv))
    cached = _cached_llama_wheel(py)
    seconds = 0.0
    steps = {}
    if extra in ("all", "cache", "local"):
        steps["torch (cpu)"] = _run([py, "-m", "pip", "install", "--quiet", TORCH], log) if extra != "local" else 0.0
        seconds += steps["torch (cpu)"]
    steps[f".[{extra}]"] = _run([py, "-m", "pip", "install", "--quiet", f"{ROOT}[{extra}]"], log)
    seconds += steps[f".[{extra}]"]
    listed = json.loads(subprocess.run([py, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True).stdout)
    return {
        "extra": extra,
        "seconds": round(seconds, 1),
        "steps_s": {k: round(v, 1) for k, v in steps.items() if v},
        "packages": len(listed),
        "site_packages_mb": round((_size(_site_packages(venv)) - empty) / 1e6, 1),
        "llama_cpp_wheel_cached_before": cached,
        "log": str(log),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extras", nargs="+", default=["remote", "all"], help="extras to time, each in a fresh venv (default: remote all)")
    p.add_argument("--python", default=sys.executable, help="the interpreter the venvs are made from")
    p.add_argument("--keep", metavar="DIR", help="make the venvs here and keep them (default: a temporary folder, removed)")
    p.add_argument("--json", dest="json_out", help="also write the results as JSON")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="milliwatt-install-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        for extra in args.extras:
            r = measure(extra, base, args.python)
            results.append(r)
            cached = ", ".join(r["llama_cpp_wheel_cached_before"]) or "none"
            print(f"milliwatt[{extra}]: {r['seconds']:.1f} s {r['steps_s']}, {r['packages']} packages, "
                  f"{r['site_packages_mb']:.0f} MB in site-packages (llama-cpp-python wheel in pip's cache before: {cached})",
                  flush=True)  # fmt: skip
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
