"""Test hosts on this machine that share nothing but the network: for tests/e2e/test_hosts.py
and bench/hosts.py.

Each host is a Linux network namespace with its own address on a private /24, joined by a veth
pair to a bridge in the root namespace (where the servers listen, on the bridge's address), its
own hostname (a UTS namespace per process, so a worker's identity `<name>@<host>:<pid>` names
its host) and its own directories (HOME, TMPDIR, state, audio work and filesystem store). Needs
root and `ip` (iproute2) and `unshare` (util-linux).

    with HostNetwork(["audio-1", "audio-2"], workdir) as net:
        redis = ThrowawayRedis(net.bridge_address).start()      # reachable from every host
        proc = net.start(net.hosts["audio-1"], "audio-1", argv, env, logdir)
        net.cut_off("audio-1")                                    # its link down: unreachable

Names carry this process's id (`bcfyh<pid>`), so two runs at once never meet; a run that died
without its clean-up (SIGKILL) leaves its namespaces and bridge behind, and the next run removes
them. On the way out (also Ctrl-C, and SIGTERM with workers.core.children.sigterm_unwinds) every
process left in a host is killed and the namespaces and bridge are removed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from workers.core.identity import process_is_gone
from workers.dev.procs import Proc

PREFIX = "bcfyh"  # every name this module makes starts with it, then the run's pid
_NAMED = re.compile(rf"^{PREFIX}(\d+)")
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?")
# Where a run's /24 is picked: 10.200.0.0 - 10.249.255.0, none in use on this machine.
_FIRST_NET, _NETS = int(ipaddress.IPv4Address("10.200.0.0")) >> 8, 50 * 256


class HostsUnavailable(RuntimeError):
    """Test hosts cannot be made here (not root, no iproute2, namespaces not permitted)."""


def _ip(*args: str) -> str:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise HostsUnavailable(f"`ip {' '.join(args)}` failed: {out.stderr.strip()}")
    return out.stdout


def why_no_hosts() -> str | None:
    """Why test hosts cannot be made on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except HostsUnavailable as exc:
        return f"network namespaces are not permitted here ({exc})"
    return None


@dataclass(frozen=True)
class Host:
    """One test host: its namespace, address, link and directories."""

    name: str  # also its hostname
    netns: str
    address: str
    link: str  # the root namespace's end of its veth pair: down cuts the host off
    root: Path  # its own directories live here
    cpus: str = ""  # the CPUs its processes may run on (taskset's list, e.g. "1"); "": any

    def env(self) -> dict[str, str]:
        """Its own working and temporary directories, as a machine of its own has them; and a
        filesystem store of its own, so a pool that reads another host's audio from a path
        fails here as it would on separate machines."""
        dirs = {
            "HOME": self.root / "home",
            "TMPDIR": self.root / "tmp",
            "BCFY_STATE_DIR": self.root / "state",
            "AUDIO_WORK_DIR": self.root / "work",
            "AUDIO_STORE_DIR": self.root / "audio",
        }
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        return {name: str(d) for name, d in dirs.items()}

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run on this host: in its network namespace, under its hostname. Each step
        execs the next, so the process (its id, its process group, its parent-death signal)
        is the one started."""
        return [
            *(("taskset", "--cpu-list", self.cpus) if self.cpus else ()),
            *("ip", "netns", "exec", self.netns),
            *("unshare", "--uts", "--"),
            *("/bin/sh", "-c", 'hostname "$0" && exec "$@"', self.name),
            *argv,
        ]


class HostNetwork:
    """A bridge and one namespace per host name, made on enter and removed on exit."""

    def __init__(
        self, names: Sequence[str], workdir: Path, cpus: Mapping[str, str] | None = None
    ) -> None:
        """One at a time in a process (its names carry the pid); `names`: distinct hostnames,
        at most 99; `cpus`: the CPUs some of them are kept to, as a machine of their own has
        its own (Host.cpus)."""
        if len(set(names)) != len(names) or not 0 < len(names) < 100:
            raise ValueError(f"host names must be distinct, 1 to 99 of them: {names}")
        if bad := [n for n in names if not _HOSTNAME.fullmatch(n)]:
            raise ValueError(f"not hostnames (a-z, 0-9, '-'): {bad}")
        self.names = list(names)
        self.cpus = dict(cpus or {})
        self.workdir = workdir
        self.run = f"{PREFIX}{os.getpid()}"
        self.bridge = self.run  # at most 12 characters of the 15 a link name may have
        self.hosts: dict[str, Host] = {}
        self.network = ipaddress.IPv4Network("10.200.0.0/24")
        self._made: list[str] = []  # namespaces made, removed on exit

    @property
    def bridge_address(self) -> str:
        """The root namespace's address on the network: where servers for the hosts listen."""
        return str(self.network.network_address + 1)

    def __enter__(self) -> HostNetwork:
        remove_leftovers()
        try:
            self.network = _free_network(os.getpid())
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, name in enumerate(self.names, start=1):
                self.hosts[name] = self._make_host(i, name)
        except BaseException:
            self.close()
            raise
        return self

    def _make_host(self, i: int, name: str) -> Host:
        netns, link = f"{self.run}-{name}", f"{self.run}v{i}"
        address = str(self.network.network_address + 1 + i)
        _ip("netns", "add", netns)
        self._made.append(netns)
        _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", link, "master", self.bridge, "up")
        _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        root = self.workdir / "hosts" / name
        return Host(name, netns, address, link, root, self.cpus.get(name, ""))

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill whatever still runs in a host, remove the namespaces (their veth pairs go with
        them) and the bridge."""
        for netns in self._made:
            _remove_netns(netns)
        self._made.clear()
        for host in self.hosts.values():
            # Gone with its namespace, but only once the kernel gets to it: now, for certain.
            subprocess.run(["ip", "link", "del", host.link], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def start(
        self, host: Host, name: str, argv: Sequence[str], env: Mapping[str, str], logdir: Path
    ) -> Proc:
        """`argv` on `host`, with `env` and the host's own directories (which win)."""
        return Proc(name, host.argv(argv), {**env, **host.env()}, logdir)

    def cut_off(self, name: str) -> None:
        """Take the host's link down: nothing reaches it or leaves it; its processes run on."""
        _ip("link", "set", self.hosts[name].link, "down")

    def reconnect(self, name: str) -> None:
        _ip("link", "set", self.hosts[name].link, "up")


def _free_network(seed: int) -> ipaddress.IPv4Network:
    """A /24 in 10.200-249.x.0 that no address or route of this machine is in, starting from
    one picked by `seed` (this run's pid), so runs at once pick different ones."""
    used = [
        ipaddress.ip_network(route["dst"], strict=False)
        for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all") or "[]")
        if route.get("dst", "default") != "default"
    ]
    for k in range(_NETS):
        net = ipaddress.IPv4Network(((_FIRST_NET + (seed + k) % _NETS) << 8, 24))
        if not any(net.overlaps(u) for u in used):
            return net
    raise HostsUnavailable("no free /24 in 10.200.0.0-10.249.255.255 for test hosts")


def _remove_netns(netns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    for pid in pids.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def remove_leftovers() -> list[str]:
    """Remove the namespaces and bridges of runs whose process is gone; returns their names."""
    gone: list[str] = []
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    bridges = subprocess.run(
        ["ip", "-j", "link", "show", "type", "bridge"], capture_output=True, text=True
    ).stdout
    for name in [line.split()[0] for line in names.splitlines() if line.strip()]:
        if _of_dead_run(name):
            _remove_netns(name)
            gone.append(name)
    for link in json.loads(bridges or "[]"):
        if _of_dead_run(link["ifname"]):
            subprocess.run(["ip", "link", "del", link["ifname"]], capture_output=True)
            gone.append(link["ifname"])
    return gone


def _of_dead_run(name: str) -> bool:
    match = _NAMED.match(name)
    if match is None or int(match.group(1)) == os.getpid():
        return False
    return process_is_gone(f"{os.uname().nodename}:{match.group(1)}")
