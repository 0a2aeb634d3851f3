#!/usr/bin/env python3
"""Builds the Switchyard wheel: the `python/switchyard` package plus the `switchyard`,
`switchyard-sim` and `switchyard-bench` binaries, with a console command for each.

    python3 scripts/build_wheel.py                 # cargo build --release, wheel in target/wheels
    python3 scripts/build_wheel.py --profile dev   # reuse a debug build (the test script does)

Only the standard library: a wheel is a zip with a few metadata files (PEP 427), and the
binaries are built by cargo, so no build backend is needed. The version is the workspace's.
"""

import argparse
import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARIES = ["switchyard", "switchyard-sim", "switchyard-bench"]
COMMANDS = {
    "switchyard": "switchyard._bin:switchyard",
    "switchyard-sim": "switchyard._bin:switchyard_sim",
    "switchyard-bench": "switchyard._bin:switchyard_bench",
}


def workspace_version():
    with open(os.path.join(ROOT, "Cargo.toml"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("[workspace.package]", 1)[1]
    match = re.search(r'^version\s*=\s*"([^"]+)"', section, re.M)
    if not match:
        sys.exit("no version in [workspace.package] of Cargo.toml")
    return match.group(1)


def platform_tag():
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


def record_line(arcname, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="release", help="cargo profile (release, dev)")
    parser.add_argument("--out", default=os.path.join(ROOT, "target", "wheels"))
    parser.add_argument("--no-build", action="store_true", help="package the binaries already built")
    parser.add_argument("--strip", action="store_true", help="strip debug info from the binaries (`strip`)")
    args = parser.parse_args()

    target_dir = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    profile_dir = "debug" if args.profile == "dev" else args.profile
    if not args.no_build:
        cmd = ["cargo", "build", "--profile", args.profile]
        for b in BINARIES:
            cmd += ["--bin", b]
        subprocess.run(cmd, cwd=ROOT, check=True)

    version = workspace_version()
    tag = f"py3-none-{platform_tag()}"
    dist_info = f"switchyard-{version}.dist-info"
    os.makedirs(args.out, exist_ok=True)
    wheel_path = os.path.join(args.out, f"switchyard-{version}-{tag}.whl")
    records = []

    def add(zf, arcname, data, executable=False):
        info = zipfile.ZipInfo(arcname, date_time=(2026, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = ((0o755 if executable else 0o644) | 0o100000) << 16
        zf.writestr(info, data)
        records.append(record_line(arcname, data))

    with zipfile.ZipFile(wheel_path, "w") as zf:
        package = os.path.join(ROOT, "python", "switchyard")
        for name in sorted(os.listdir(package)):
            if name.endswith(".py") and name != "_version.py":
                with open(os.path.join(package, name), "rb") as f:
                    add(zf, f"switchyard/{name}", f.read())
        add(zf, "switchyard/_version.py", f'__version__ = "{version}"\n'.encode())
        for b in BINARIES:
            path = os.path.join(target_dir, profile_dir, b)
            if not os.path.isfile(path):
                sys.exit(f"{path} is missing: build it first (or drop --no-build)")
            if args.strip and shutil.which("strip"):
                with tempfile.TemporaryDirectory() as tmp:
                    stripped = os.path.join(tmp, b)
                    subprocess.run(["strip", "--strip-debug", "-o", stripped, path], check=True)
                    with open(stripped, "rb") as f:
                        add(zf, f"switchyard/_bin/{b}", f.read(), executable=True)
            else:
                with open(path, "rb") as f:
                    add(zf, f"switchyard/_bin/{b}", f.read(), executable=True)
        metadata = (
            "Metadata-Version: 2.1\n"
            "Name: switchyard\n"
            f"Version: {version}\n"
            "Summary: LLM inference router for SGLang and vLLM fleets (regular and prefill/decode)\n"
            "License: Apache-2.0\n"
            "Requires-Python: >=3.8\n"
        )
        add(zf, f"{dist_info}/METADATA", metadata.encode())
        wheel = f"Wheel-Version: 1.0\nGenerator: switchyard-build-wheel\nRoot-Is-Purelib: false\nTag: {tag}\n"
        add(zf, f"{dist_info}/WHEEL", wheel.encode())
        entry_points = "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in COMMANDS.items())
        add(zf, f"{dist_info}/entry_points.txt", entry_points.encode())
        records.append(f"{dist_info}/RECORD,,")
        info = zipfile.ZipInfo(f"{dist_info}/RECORD", date_time=(2026, 1, 1, 0, 0, 0))
        zf.writestr(info, "\n".join(records) + "\n")
    print(wheel_path)


if __name__ == "__main__":
    main()
