"""`bcfy sim`: the feed simulator in the foreground (demo mode).

    bcfy sim [--host 127.0.0.1] [--port 8089] [--playlists 2] [--calls-per-minute 6] [--seed 1]

Prints the environment a pipeline needs to use it, then logs one line per request (stderr).
Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from workers.cli import Subparsers
from workers.core.settings import Settings
from workers.dev.simulator.server import DEMO_API_KEYS, DEMO_USERS, FeedSimulator


def add_commands(sub: Subparsers) -> None:
    sim = sub.add_parser("sim", help="run the Broadcastify feed simulator (demo mode)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8089)
    sim.add_argument("--playlists", type=int, default=2, help="public playlists to make")
    sim.add_argument("--calls-per-minute", type=float, default=6.0, help="per playlist")
    sim.add_argument("--seed", type=int, default=1)
    sim.set_defaults(handler=run_simulator)


def run_simulator(args: argparse.Namespace, settings: Settings) -> int:
    if args.playlists < 0 or args.calls_per_minute < 0:
        print("bcfy sim: --playlists and --calls-per-minute must be >= 0", file=sys.stderr)
        return 2
    api_keys = dict(DEMO_API_KEYS)
    # A key configured in the environment is accepted too (never printed), so a pipeline set up
    # for the real service can be pointed at the simulator by changing BCFY_API_BASE alone.
    # All three must be set (non-empty); otherwise only the demo key is accepted.
    key_id, secret, app_id = (
        settings.broadcastify.api_key_id,
        settings.broadcastify.api_key.reveal(),
        settings.broadcastify.app_id,
    )
    env_key_accepted = bool(key_id and secret and app_id)
    if env_key_accepted:
        api_keys[key_id] = (secret, app_id)
    try:
        sim = FeedSimulator(api_keys, DEMO_USERS, seed=args.seed, host=args.host, port=args.port)
    except OSError as exc:
        print(f"bcfy sim: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    uuids = [
        sim.add_playlist(name=f"Demo playlist {n + 1}", calls_per_minute=args.calls_per_minute)
        for n in range(args.playlists)
    ]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    sim.start()
    print(_environment(sim, uuids, env_key_accepted), flush=True)
    while not stop.wait(0.5):
        pass
    sim.stop()
    print("bcfy sim: stopped", flush=True)
    return 0


def _environment(sim: FeedSimulator, uuids: list[str], env_key_accepted: bool) -> str:
    user, (password, _uid) = next(iter(DEMO_USERS.items()))
    lines = [
        f"# bcfy sim: a Broadcastify-compatible feed on {sim.url} (demo credentials, not secrets)",
        "# Paste into the pipeline's environment:",
        *(f"export {name}={value}" for name, value in sim.pipeline_env().items()),
        f"export BCFY_SIM_PLAYLISTS='{' '.join(uuids)}'",
        f"# optional, to act as a user: BCFY_USERNAME={user} BCFY_PASSWORD={password}",
        "# follow the playlists: for p in $BCFY_SIM_PLAYLISTS; do bcfy playlists add $p; done",
        f"# test controls: {sim.url}/_sim/stats  (POST /_sim/faults, /_sim/publish)",
    ]
    if env_key_accepted:
        lines.insert(2, "# the API key in this environment (BCFY_API_KEY_ID ...) is accepted too")
    return "\n".join(lines)
