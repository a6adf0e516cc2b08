"""A Broadcastify-compatible feed simulator: demo mode (`bcfy sim`), and the service the tests
talk to over real HTTP.

    from workers.dev.simulator import FeedSimulator, ManualClock, Faults, AudioFault

    with FeedSimulator(clock=ManualClock(1_700_000_000), seed=1) as sim:
        uuid = sim.add_playlist(calls_per_minute=6)
        sim.publish_call(uuid, audio=AudioFault.TRUNCATED)
        ...  # talk to sim.url; sim.billed_records counts every call record served

feed.py says how positions (`pos`, `lastPos`) work; server.py how tokens are checked, which
errors come back, and the /_sim control surface; faults.py what each switch does.
"""

from workers.dev.simulator.faults import AudioFault, Faults
from workers.dev.simulator.feed import OMIT, ManualClock
from workers.dev.simulator.server import DEMO_API_KEYS, DEMO_USERS, FeedSimulator

__all__ = [
    "DEMO_API_KEYS",
    "DEMO_USERS",
    "OMIT",
    "AudioFault",
    "Faults",
    "FeedSimulator",
    "ManualClock",
]
