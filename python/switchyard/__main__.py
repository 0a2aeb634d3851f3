"""`python -m switchyard ...` runs the router with Switchyard's own arguments."""

from ._bin import switchyard

switchyard()
