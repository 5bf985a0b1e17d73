"""Refresh the pinned environment: envs/requirements.lock and the pins of envs/pipeline.yaml.

The lock is what the suite and the README's figures run with; pip takes it as a constraints
file (`pip install -c envs/requirements.lock -e ".[test]"`). To move to newer packages, make a
fresh environment without the lock, then write the lock from it and run the suite:

    python3 -m venv /tmp/fresh && . /tmp/fresh/bin/activate
    pip install -e ".[test]" && python envs/refresh_lock.py && pytest -q
"""
from __future__ import annotations

import datetime
import platform
import re
import subprocess
import sys
from pathlib import Path

ENVS = Path(__file__).resolve().parent
LOCK = ENVS / "requirements.lock"
PIPELINE_ENV = ENVS / "pipeline.yaml"
PIN = re.compile(r"^(?P<indent>\s*-\s+)(?P<name>[A-Za-z0-9_.\-]+)(==[^\s#]+)?(?P<rest>\s*(#.*)?)$")


def normalise(name: str) -> str:
    """PEP 503 names, so `scikit_learn` and `scikit-learn` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """The lock's `name==version` lines as {normalised name: version}."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalise(name)] = version
    return pins


def pin_environment(text: str, pins: dict[str, str]) -> str:
    """The conda environment's pip entries pinned to the lock's versions (comments kept)."""
    lines, in_pip = [], False
    for line in text.splitlines():
        if line.strip() == "- pip:":
            in_pip = True
        elif in_pip and (m := PIN.match(line)):
            name = m["name"]
            if normalise(name) not in pins:
                raise SystemExit(f"{PIPELINE_ENV}: {name} is not installed in this environment; install the "
                                 "project first (pip install -e '.[test]')")
            line = f"{m['indent']}{name}=={pins[normalise(name)]}{m['rest']}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> None:
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout
    requirements = sorted((line for line in frozen.splitlines() if "==" in line), key=str.lower)
    header = (f"# Exact versions the test suite runs with, and the README's figures measured from "
              f"{datetime.date.today().isoformat()} on: Python {platform.python_version()}, {platform.system()} "
              f"{platform.machine()}; written by envs/refresh_lock.py.\n"
              "# Use: pip install -c envs/requirements.lock -e \".[test]\"\n")
    LOCK.write_text(header + "\n".join(requirements) + "\n")
    PIPELINE_ENV.write_text(pin_environment(PIPELINE_ENV.read_text(), read_lock(LOCK)))
    print(f"{LOCK}: {len(requirements)} packages; {PIPELINE_ENV} pinned to the same versions")


if __name__ == "__main__":
    main()
