"""Process handling shared by the client tests: nothing they start may outlive them or hang them."""

import subprocess


def stop(proc):
    """SIGTERM; the exit status, or None if it had to be killed after 15 s."""
    proc.terminate()
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None
