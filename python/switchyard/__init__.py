"""Switchyard, an LLM inference router, packaged for pip.

The wheel carries the `switchyard`, `switchyard-sim` and `switchyard-bench` binaries and
installs a command for each; `python -m switchyard.launch_router` takes sglang-router's
launcher arguments.
"""

try:
    from ._version import __version__  # written into the wheel by scripts/build_wheel.py
except ImportError:  # a source checkout
    __version__ = "0+source"

__all__ = ["__version__"]
