"""What every benchmark result carries: versions, commit, hardware; and how it is written."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    import torch

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                cwd=os.path.dirname(__file__),
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "python": platform.python_version(),
        "versions": {
            p: _version(p) for p in ("torch", "transformers", "deepspeed", "ray", "lfdist")
        },
        "hardware": {
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "gpu": gpu,
            "memory_gib": round(
                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
            ),
        },
    }


def write_result(
    out_dir: str, name: str, result: dict, markdown: str, verb: str = "Measured"
) -> str:
    """verb heads the Markdown: "Measured", or "Computed" for predictions that measure nothing."""
    os.makedirs(out_dir, exist_ok=True)
    result.setdefault("environment", environment())
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return write_markdown(out_dir, name, result, markdown, verb)


def write_markdown(
    out_dir: str, name: str, result: dict, markdown: str, verb: str = "Measured"
) -> str:
    """name.md: a line saying when, where and with what `result` was measured, then `markdown`."""
    env = result["environment"]
    head = (
        f"{verb} {env['date']} at commit {env['commit']} on {env['hardware']['cpu']} "
        f"({env['hardware']['cpu_count']} cores, GPU: {env['hardware']['gpu'] or 'none'}); "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
        + ".\n\n"
    )
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(head + markdown.rstrip() + "\n")
    return os.path.join(out_dir, f"{name}.md")
