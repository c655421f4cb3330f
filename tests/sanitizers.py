"""Building a C extension with AddressSanitizer and UndefinedBehaviorSanitizer, and the
environment a Python process needs to load it (the sanitizers' runtimes preloaded)."""

from __future__ import annotations

import os
import subprocess
import sysconfig
from pathlib import Path


def build(source: Path, out_dir: Path, *extra: str) -> Path:
    """Compile ``source`` into ``out_dir`` as an extension module named like it."""
    built = out_dir / (source.stem + str(sysconfig.get_config_var("EXT_SUFFIX")))
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror",
                    f"-I{sysconfig.get_paths()['include']}", *extra, str(source), "-o",
                    str(built)], check=True, capture_output=True, timeout=120)
    return built


def environment() -> dict[str, str]:
    runtime = [subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True,
                              text=True, check=True).stdout.strip()
               for lib in ("libasan.so", "libubsan.so")]
    return {**os.environ, "LD_PRELOAD": " ".join(runtime),
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
            "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
