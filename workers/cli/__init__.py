"""The `bcfy` command: one module per command group (main.py parses and dispatches; `run` is
the whole pipeline on one machine). Commands use the machinery; nothing imports a command."""

from __future__ import annotations

import argparse
from typing import TypeAlias

# What each command module's `add_commands(sub)` is given: argparse's subparsers action, which
# has no public name (a string, so nothing private is touched when the program runs).
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
