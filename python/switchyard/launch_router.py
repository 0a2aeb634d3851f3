"""`python -m switchyard.launch_router`: sglang-router's launcher arguments, run by Switchyard.

Users start sglang-router with `python -m sglang_router.launch_router ARGS`; the same ARGS
work here. Each argument sglang-router's launcher defines is either translated to Switchyard's
flag (most have the same name), accepted because Switchyard always behaves that way, or refused
with an error naming it: Switchyard never silently ignores an argument. Arguments sglang-router
does not define are passed to Switchyard as they are, so its own flags (`--mu-*`, `--tls-*`,
...) can be mixed in.

`translate(argv)` returns Switchyard's arguments; `main()` runs the bundled binary with them.
"""

import argparse
import sys

# sglang-router argument → how Switchyard takes it.
#   ("same", None)            the same flag and values
#   ("rename", "--flag")      another name, same values
#   ("flag", ["--x", "v"])    a store_true argument that becomes these arguments
#   ("accept", why)           Switchyard always does this: nothing to pass
#   ("refuse", why)           not supported: an error names it
SAME = ("same", None)
ARGUMENTS = {
    "--host": SAME,
    "--port": SAME,
    "--worker-urls": SAME,
    "--policy": SAME,
    "--prefill-policy": SAME,
    "--decode-policy": SAME,
    "--mini-lb": ("refuse", "Switchyard has no MiniLB mode; PD routing is --pd-disaggregation"),
    "--pd-disaggregation": ("flag", ["--pd-disaggregation"]),
    "--prefill": SAME,
    "--decode": SAME,
    "--worker-startup-timeout-secs": SAME,
    "--worker-startup-check-interval": (
        "accept",
        "workers still starting are probed every second until ready",
    ),
    "--cache-threshold": SAME,
    "--balance-abs-threshold": SAME,
    "--balance-rel-threshold": SAME,
    "--eviction-interval-secs": ("rename", "--eviction-interval"),
    "--eviction-interval": SAME,  # older sglang-router releases
    "--max-tree-size": SAME,
    "--max-payload-size": SAME,
    "--dp-aware": ("flag", ["--dp-aware"]),
    "--enable-igw": ("accept", "every model the workers serve gets its own pool"),
    "--api-key": ("rename", "--worker-api-key"),
    "--log-dir": SAME,
    "--log-level": ("level", None),
    "--service-discovery": ("flag", ["--service-discovery"]),
    "--selector": SAME,
    "--service-discovery-port": SAME,
    "--service-discovery-namespace": SAME,
    "--prefill-selector": SAME,
    "--decode-selector": SAME,
    "--bootstrap-port-annotation": SAME,
    "--prometheus-port": SAME,
    "--prometheus-host": SAME,
    "--request-id-headers": (
        "refuse",
        "Switchyard reads and echoes x-request-id only",
    ),
    "--request-timeout-secs": SAME,
    "--retry-max-retries": SAME,
    "--retry-initial-backoff-ms": SAME,
    "--retry-max-backoff-ms": SAME,
    "--retry-backoff-multiplier": SAME,
    "--retry-jitter-factor": SAME,
    "--disable-retries": ("flag", ["--retry-max-retries", "1"]),
    "--cb-failure-threshold": SAME,
    "--cb-success-threshold": SAME,
    "--cb-timeout-duration-secs": SAME,
    "--cb-window-duration-secs": (
        "refuse",
        "Switchyard's breaker counts consecutive failures, not failures in a window",
    ),
    "--disable-circuit-breaker": ("flag", ["--cb-failure-threshold", "4294967295"]),
    "--health-failure-threshold": SAME,
    "--health-success-threshold": SAME,
    "--health-check-timeout-secs": SAME,
    "--health-check-interval-secs": SAME,
    "--health-check-endpoint": SAME,
    "--max-concurrent-requests": SAME,
    "--queue-size": SAME,
    "--queue-timeout-secs": SAME,
    "--rate-limit-tokens-per-second": (
        "refuse",
        "Switchyard limits concurrency (--max-concurrent-requests), not a token rate",
    ),
    "--cors-allowed-origins": ("refuse", "Switchyard sends no CORS headers"),
    # A local model directory or tokenizer.json (nothing is downloaded from a model hub).
    "--model-path": SAME,
    "--tokenizer-path": SAME,
}

# How many values each argument takes (argparse `nargs`), as sglang-router parses them.
_NARGS = {
    "--worker-urls": "*",
    "--prefill": "+",
    "--decode": 1,
    "--selector": "+",
    "--prefill-selector": "+",
    "--decode-selector": "+",
    "--request-id-headers": "*",
    "--cors-allowed-origins": "*",
}
_REPEATABLE = {"--prefill", "--decode"}
_LOG_LEVELS = {"debug": "debug", "info": "info", "warning": "warn", "error": "error", "critical": "error"}


class UnsupportedArguments(ValueError):
    """sglang-router arguments Switchyard does not support."""


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m switchyard.launch_router",
        allow_abbrev=False,
        description="Switchyard with sglang-router's launcher arguments "
        "(others are passed to switchyard as they are).",
    )
    for name, (kind, _) in ARGUMENTS.items():
        dest = name[2:].replace("-", "_")
        if kind == "flag" or name in ("--mini-lb", "--enable-igw"):
            parser.add_argument(name, dest=dest, action="store_true", default=argparse.SUPPRESS)
        elif name in _REPEATABLE:
            parser.add_argument(name, dest=dest, nargs=_NARGS[name], action="append", default=argparse.SUPPRESS)
        elif name == "--log-level":
            parser.add_argument(name, dest=dest, choices=sorted(_LOG_LEVELS), default=argparse.SUPPRESS)
        else:
            parser.add_argument(name, dest=dest, nargs=_NARGS.get(name), default=argparse.SUPPRESS)
    return parser


def translate(argv):
    """Switchyard's arguments for sglang-router launcher arguments `argv`.

    Raises UnsupportedArguments naming every argument Switchyard does not support.
    """
    known, passthrough = _parser().parse_known_args(argv)
    given = vars(known)
    out, refused = [], []
    for name, (kind, detail) in ARGUMENTS.items():
        dest = name[2:].replace("-", "_")
        if dest not in given:
            continue
        value = given[dest]
        if kind == "refuse":
            refused.append(f"{name} ({detail})")
        elif kind == "accept":
            continue
        elif kind == "flag":
            if value:
                out.extend(detail)
        elif kind == "level":
            out.extend(["--log-level", _LOG_LEVELS[value]])
        else:
            flag = detail if kind == "rename" else name
            if name in _REPEATABLE:
                for occurrence in value:
                    out.extend([flag, *occurrence])
            elif isinstance(value, list):
                if value:
                    out.extend([flag, *value])
            else:
                out.extend([flag, str(value)])
    if refused:
        raise UnsupportedArguments(
            "switchyard does not support these sglang-router arguments: " + "; ".join(refused)
        )
    return out + passthrough


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = translate(argv)
    except UnsupportedArguments as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ._bin import exec_binary

    exec_binary("switchyard", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
