"""`emo-serve bench SUITE`: wiring only; the suites are registered in server/tools/bench/suites.py."""

from server.tools.bench.suites import add_arguments, run

__all__ = ["add_arguments", "run"]
