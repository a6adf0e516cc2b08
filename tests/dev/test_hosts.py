"""workers.dev.hosts: test hosts on network namespaces reach the bridge's servers under names
and addresses of their own, can be cut off, and leave nothing behind, however the run ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.dev.hosts import PREFIX, HostNetwork, remove_leftovers, why_no_hosts
from workers.dev.procs import ROOT, wait_until

pytestmark = pytest.mark.skipif(
    (reason := why_no_hosts()) is not None, reason=f"test hosts cannot be made here: {reason}"
)

# Connects to the address and port given, prints the hostname, the address it connected from,
# and what the server said (or the error).
CLIENT = textwrap.dedent(
    """
    import socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as s:
            print(socket.gethostname(), s.getsockname()[0], s.recv(100).decode())
    except OSError as exc:
        print(socket.gethostname(), "-", type(exc).__name__)
    """
)


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return {line.split(": ")[1].split("@")[0] for line in out.stdout.splitlines()}


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP socket for the server on the bridge (bound by the test)."""
    with socket.socket() as s:
        yield s


def ask(net: HostNetwork, host: str, port: int, tmp_path: Path) -> list[str]:
    proc = net.start(
        net.hosts[host],
        f"client-{host}",
        [sys.executable, "-c", CLIENT, net.bridge_address, str(port)],
        {},
        tmp_path,
    )
    proc.popen.wait(30)
    proc.stop()
    return proc.log().split()


def test_hosts_reach_the_bridge_by_their_own_address_and_name_until_cut_off(
    tmp_path: Path, listener: socket.socket
) -> None:
    with HostNetwork(["one", "two"], tmp_path) as net:
        listener.bind((net.bridge_address, 0))
        listener.listen()
        port = listener.getsockname()[1]
        served: list[str] = []

        def serve() -> None:
            while True:
                try:
                    conn, (address, _) = listener.accept()
                except OSError:  # closed: the test is over
                    return
                with conn:
                    conn.sendall(b"hello")
                served.append(address)

        threading.Thread(target=serve, daemon=True).start()
        for name in ("one", "two"):
            assert ask(net, name, port, tmp_path) == [name, net.hosts[name].address, "hello"]
        assert served == [net.hosts["one"].address, net.hosts["two"].address]
        assert net.hosts["one"].address != net.hosts["two"].address
        assert str(net.network).startswith("10.")

        # Cut off, a host reaches nothing; the other still does; back on, it does again (once
        # its neighbour entry for the bridge is learnt again).
        net.cut_off("one")
        assert ask(net, "one", port, tmp_path)[:2] == ["one", "-"]
        assert ask(net, "two", port, tmp_path)[2] == "hello"
        net.reconnect("one")
        wait_until(lambda: ask(net, "one", port, tmp_path)[2] == "hello", 30, "one back on")

        # Each host has directories of its own, none shared.
        dirs = [set(h.env().values()) for h in net.hosts.values()]
        assert dirs[0].isdisjoint(dirs[1])
        made = {h.netns for h in net.hosts.values()} | {net.bridge}
    assert made.isdisjoint(namespaces() | links())


def test_nothing_is_left_when_the_run_is_stopped_by_sigterm(tmp_path: Path) -> None:
    """A run stopped by SIGTERM (workers.core.children.sigterm_unwinds) kills what runs in its
    hosts and removes them."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from workers.core.children import sigterm_unwinds
        from workers.dev.hosts import HostNetwork
        sigterm_unwinds()
        with HostNetwork(["solo"], Path({str(tmp_path)!r})) as net:
            proc = net.start(net.hosts["solo"], "sleeper", ["sleep", "300"], {{}}, net.workdir)
            print(net.bridge, net.hosts["solo"].netns, proc.pid, flush=True)
            time.sleep(300)
        """
    )
    run = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # its KeyboardInterrupt, as SIGTERM unwinds it
        text=True,
    )
    assert run.stdout is not None
    bridge, netns, sleeper = run.stdout.readline().split()
    assert netns in namespaces() and bridge in links()
    run.send_signal(signal.SIGTERM)
    run.wait(30)
    assert netns not in namespaces() and bridge not in links()
    wait_until(lambda: not Path(f"/proc/{sleeper}").exists(), 10, "the sleeper to be gone")


def test_the_leftovers_of_a_dead_run_are_removed_and_a_live_runs_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone, live = f"{PREFIX}{dead.pid}", f"{PREFIX}1"  # pid 1 lives as long as the machine
    subprocess.run(["ip", "netns", "add", f"{gone}-x"], check=True)
    subprocess.run(["ip", "link", "add", gone, "type", "bridge"], check=True)
    subprocess.run(["ip", "netns", "add", f"{live}-x"], check=True)
    try:
        assert set(remove_leftovers()) >= {f"{gone}-x", gone}
        assert f"{gone}-x" not in namespaces() and gone not in links()
        assert f"{live}-x" in namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", f"{live}-x"], capture_output=True)
        subprocess.run(["ip", "netns", "del", f"{gone}-x"], capture_output=True)
        subprocess.run(["ip", "link", "del", gone], capture_output=True)


def test_a_host_kept_to_a_cpu_runs_only_there(tmp_path: Path) -> None:
    with HostNetwork(["pinned", "free"], tmp_path, cpus={"pinned": "0"}) as net:
        seen = {}
        for name, host in net.hosts.items():
            proc = net.start(
                host,
                name,
                [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                {},
                tmp_path,
            )
            proc.popen.wait(30)
            proc.stop()
            seen[name] = proc.log().strip()
    assert seen == {"pinned": "[0]", "free": str(sorted(os.sched_getaffinity(0)))}
