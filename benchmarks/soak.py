"""A soak: ``concierge demo`` with its defaults for N minutes, watched from outside.

Every ``--interval`` seconds (10 by default) it samples, per process role of the demo's tree
(``demo``, ``broker``, ``worker``, ``api``, ``recruitment``, ``dashboard``, ``smtp``; the roles
and pids come from ``$CONCIERGE_HOME/logs/demo-processes.json``, which the demo writes), the
resident memory of that process and its descendants, and the readiness and lag each reader
reports (``GET /readyz`` on the API and on the worker's web port; a reader without one, or one
that does not answer, is recorded as an error, never assumed ready). At the end it stops the demo
with SIGTERM, as an operator would, counts the ERROR and Traceback lines each process wrote to its
log during the soak, and writes one JSON object (``benchmarks/results/soak.json`` by default):
name, minutes, command, date, per-process errors and RSS series (min/max/last), readiness and lag
series (max/last), whether anything died. It exits non-zero if any process logged an error or
died, if the demo did not stop cleanly, or if a reader never reported itself ready.

    python -m benchmarks.soak --minutes 60
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from core.settings import Settings

ROLES = ("demo", "broker", "worker", "api", "recruitment", "dashboard", "smtp")
ERROR_LINE = re.compile(r"\bERROR\b|Traceback \(most recent call last\)")
PAGE = 4096


# ------------------------------------------------------------------------------- /proc


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(") ", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def descendants(pid: int, children: Mapping[int, list[int]]) -> list[int]:
    found, frontier = [pid], [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.append(child)
                frontier.append(child)
    return found


def rss_bytes(pid: int) -> int | None:
    """Resident memory of one process (None when it is gone or a zombie)."""
    try:
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return None
    resident = int(statm[1]) * PAGE
    return resident or None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# ------------------------------------------------------------------------------ series


@dataclass
class Series:
    values: list[float] = field(default_factory=list)

    def add(self, value: float | None) -> None:
        if value is not None:
            self.values.append(value)

    def summary(self, digits: int = 1) -> dict[str, Any]:
        if not self.values:
            return {"samples": 0, "min": None, "max": None, "last": None}
        return {
            "samples": len(self.values),
            "min": round(min(self.values), digits),
            "max": round(max(self.values), digits),
            "last": round(self.values[-1], digits),
        }


@dataclass
class Reader:
    """What one reader's ``/readyz`` said over the soak."""

    url: str
    ready: int = 0
    not_ready: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lag: Series = field(default_factory=Series)
    waiting_for: dict[str, int] = field(default_factory=dict)
    last: Any = None

    def sample(self) -> None:
        try:
            response = httpx.get(self.url, timeout=5)
        except httpx.HTTPError as exc:
            self._error(f"unreachable ({type(exc).__name__})")
            return
        if response.status_code == 404:
            self._error("no /readyz (404)")
            return
        try:
            body = response.json()
        except ValueError:
            self._error(f"{response.status_code} with a body that is not JSON")
            return
        self.last = body
        if response.status_code == 200 and isinstance(body, dict) and body.get("ready") is True:
            self.ready += 1
        elif response.status_code == 503 and isinstance(body, dict) and body.get("ready") is False:
            self.not_ready += 1
            for part in body.get("waiting_for") or []:
                key = part if isinstance(part, str) else json.dumps(part, sort_keys=True)
                self.waiting_for[key] = self.waiting_for.get(key, 0) + 1
        else:
            self._error(f"{response.status_code} without a readiness answer")
            return
        self.lag.add(lag_of(body))

    def _error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def summary(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "ready_samples": self.ready,
            "not_ready_samples": self.not_ready,
            "errors": self.errors,
            "waiting_for": self.waiting_for,
            "lag": self.lag.summary(0),
            "last": self.last,
        }


def lag_of(body: Any) -> float | None:
    """The largest number under a key that names a lag, anywhere in a readiness answer."""
    found: list[float] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if "lag" in str(key).lower() and isinstance(value, int | float):
                    if not isinstance(value, bool):
                        found.append(float(value))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(body)
    return max(found) if found else None


# --------------------------------------------------------------------------------- logs


def log_sizes(paths: Iterable[Path]) -> dict[Path, int]:
    return {p: (p.stat().st_size if p.exists() else 0) for p in paths}


def errors_since(path: Path, offset: int, keep: int = 5) -> tuple[int, list[str]]:
    """ERROR and Traceback lines written to ``path`` after ``offset``; the first few."""
    if not path.exists():
        return 0, []
    with path.open("rb") as f:
        f.seek(offset if path.stat().st_size >= offset else 0)
        text = f.read().decode(errors="replace")
    lines = [line for line in text.splitlines() if ERROR_LINE.search(line)]
    return len(lines), [line[:300] for line in lines[:keep]]


# --------------------------------------------------------------------------------- soak


def read_roles(registry: Path) -> dict[str, dict[str, Any]]:
    try:
        document = json.loads(registry.read_text())
    except (OSError, ValueError):
        return {}
    roles: dict[str, dict[str, Any]] = dict(document.get("roles", {}))
    if document.get("demo"):
        roles.setdefault("demo", {"pid": document["demo"], "log": None})
    return roles


def broker_log(home: Path, port: str) -> Path:
    data = home / "kafka" / f"broker-{port}"
    server = data / "server.log"
    return server if server.exists() else data / "broker.out"


def soak(minutes: float, interval: float, out: Path, demo_args: list[str]) -> int:
    home = Path(os.environ.get("CONCIERGE_HOME", Path.home() / ".local/share/concierge"))
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    registry = logs / "demo-processes.json"
    registry.unlink(missing_ok=True)
    api_port = os.environ.get("CONCIERGE_API_PORT", "8000")
    # where the worker's pages listen (CONCIERGE_WORKER_WEB_BIND, loopback by default); its
    # /readyz needs no token
    worker_url = Settings().worker_address()
    broker_port = os.environ.get("CONCIERGE_BROKER_PORT", "9092")
    command = [sys.executable, "-m", "concierge", "demo", *demo_args]
    demo_log = logs / "demo.out"
    role_logs: dict[str, Path] = {
        "demo": demo_log,
        "broker": broker_log(home, broker_port),
        "worker": logs / "worker.log",
        "api": logs / "api.log",
        "recruitment": logs / "recruitment.log",
        "dashboard": logs / "dashboard.log",
        "smtp": logs / "mail.log",
    }
    offsets = log_sizes(role_logs.values())
    started = time.monotonic()
    date = datetime.now(UTC).isoformat(timespec="seconds")
    say(f"soak: {' '.join(command)} for {minutes:g} min; CONCIERGE_HOME={home}")
    with demo_log.open("ab") as output:
        demo = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    rss = {role: Series() for role in ROLES}
    seen: dict[str, int] = {}
    died: dict[str, str] = {}
    readers = {
        "api": Reader(f"http://127.0.0.1:{api_port}/readyz"),
        "worker": Reader(f"{worker_url}/readyz"),
    }
    samples = 0
    end = started + minutes * 60
    demo_code: int | None = None
    try:
        while time.monotonic() < end:
            time.sleep(max(0.0, min(interval, end - time.monotonic())))
            samples += 1
            demo_code = demo.poll()
            if demo_code is not None:
                died["demo"] = f"exited {demo_code} after {time.monotonic() - started:.0f} s"
                break
            roles = read_roles(registry)
            children = _children_map()
            for role, info in roles.items():
                pid = int(info["pid"])
                if role in seen and seen[role] != pid and role not in died:
                    died[role] = f"pid {seen[role]} replaced by {pid}"
                seen[role] = pid
                if info.get("log"):
                    role_logs.setdefault(role, Path(info["log"]))
                if not alive(pid):
                    died.setdefault(role, f"gone at {time.monotonic() - started:.0f} s")
                    continue
                # a role is its process and what it started; the demo's own children are roles
                tree = [pid] if role == "demo" else descendants(pid, children)
                total = sum(rss_bytes(p) or 0 for p in tree)
                rss.setdefault(role, Series()).add(total / 2**20)
            for missing in set(seen) - set(roles):
                died.setdefault(missing, "left the demo's process list")
            if roles:  # readers are asked once the demo has started them
                for reader in readers.values():
                    reader.sample()
            mb = {r: s.values[-1] for r, s in rss.items() if s.values}
            say(
                f"soak: {time.monotonic() - started:5.0f} s  "
                + "  ".join(f"{r} {v:.0f} MB" for r, v in mb.items())
                + "  ready: "
                + ", ".join(
                    f"{n} {'yes' if r.last and r.last.get('ready') else 'no'}"
                    for n, r in readers.items()
                )
            )
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGTERM)  # the demo stops its own children
            try:
                demo_code = demo.wait(90)
            except subprocess.TimeoutExpired:
                died.setdefault("demo", "did not stop within 90 s of SIGTERM")
                os.killpg(demo.pid, signal.SIGKILL)
                demo_code = demo.wait(10)
        else:
            demo_code = demo.returncode
    leftovers = [
        role
        for role, pid in seen.items()
        if role not in ("broker", "demo") and alive(pid)  # the broker outlives the demo
    ]
    processes: dict[str, Any] = {}
    failed = bool(died) or bool(leftovers) or demo_code not in (0, None)
    for role in sorted(set(ROLES) | set(seen)):
        path = role_logs.get(role)
        count, first = errors_since(path, offsets.get(path, 0)) if path else (0, [])
        failed = failed or count > 0
        processes[role] = {
            "pid": seen.get(role),
            "log": str(path) if path else None,
            "errors": count,
            "first_errors": first,
            "died": died.get(role),
            "rss_mb": rss[role].summary() if role in rss else Series().summary(),
        }
    readiness = {name: reader.summary() for name, reader in readers.items()}
    never_ready = [n for n, r in readers.items() if r.ready == 0]
    failed = failed or bool(never_ready)
    result = {
        "name": "soak",
        "minutes": minutes,
        "elapsed_seconds": round(time.monotonic() - started, 1),
        "interval_seconds": interval,
        "samples": samples,
        "processes": processes,
        "readiness": readiness,
        "readers_never_ready": never_ready,
        "left_running_after_sigterm": leftovers,
        "demo_exit_code": demo_code,
        "ok": not failed,
        "command": " ".join(command),
        "date": date,
        "concierge_home": str(home),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    say(f"soak: {'ok' if not failed else 'FAILED'}; wrote {out}")
    for role, info in processes.items():
        if info["errors"] or info["died"]:
            say(f"  {role}: {info['errors']} error line(s); died: {info['died']}")
            for line in info["first_errors"]:
                say(f"    {line}")
    for name in never_ready:
        say(f"  {name} never reported ready: {readiness[name]['errors']}")
    return 1 if failed else 0


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    parser.add_argument("demo_args", nargs="*", help="after --: options for concierge demo")
    args = parser.parse_args(argv)
    return soak(args.minutes, args.interval, args.out, args.demo_args)


if __name__ == "__main__":
    raise SystemExit(main())
