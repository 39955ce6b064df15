"""What a run opens to the network. An embedded run (`pretrain train`, one node) listens on the
loopback interface only: every socket of every process, the driver's, Ray's, and the training
workers' (torch.distributed's rendezvous store, gloo's pairs). A worker group across nodes keeps
the listeners other nodes must reach, and only those (`MULTI_NODE_OFF_LOOPBACK`); both shapes'
rendezvous are also checked in two plain processes, without Ray."""

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from tests.run_fixtures import tiny_run

# The listeners a worker group that spans nodes opens beyond loopback, because the other nodes'
# ranks connect to them (torch.distributed authenticates neither: docs/security.md):
MULTI_NODE_OFF_LOOPBACK = {
    "store": "rank 0's TCPStore, torch's env:// rendezvous at MASTER_ADDR:MASTER_PORT, on every interface",
    "gloo": "each rank's gloo listener (CPU collectives), on GLOO_SOCKET_IFNAME or its hostname's address",
    "nccl": "each rank's NCCL bootstrap and proxy listeners (GPU collectives), on NCCL_SOCKET_IFNAME "
    "or NCCL's pick",
}
# Ray's own daemons on a multi-node cluster are the cluster's (`ray start`, KubeRay), not the run's.


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or addr).is_loopback


def _listeners(pids: dict[int, str]) -> dict[tuple, str]:
    """(pid, "tcp"/"udp", ip, port) -> process name, of every listening TCP socket and every bound,
    unconnected UDP socket (IPv4 and IPv6) that a process in `pids` holds."""
    found = {}
    for c in psutil.net_connections("inet"):
        if c.pid not in pids or not c.laddr:
            continue
        if c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN:
            found[(c.pid, "tcp", c.laddr.ip, c.laddr.port)] = pids[c.pid]
        elif c.type == socket.SOCK_DGRAM and not c.raddr:
            found[(c.pid, "udp", c.laddr.ip, c.laddr.port)] = pids[c.pid]
    return found


def _tree(root: psutil.Process) -> dict[int, str]:
    """pid -> name of `root` and all its descendants alive now."""
    procs = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            procs[p.pid] = p.name()
        except psutil.NoSuchProcess:
            pass
    return procs


def _connected(worker_pids: set[int]) -> bool:
    """Whether two training workers hold a TCP connection to each other: their process group (its
    store, gloo's pairs) exists."""
    conns = [c for c in psutil.net_connections("tcp") if c.pid in worker_pids]
    local = {(c.laddr.ip, c.laddr.port): c.pid for c in conns}
    return any(c.raddr and local.get((c.raddr.ip, c.raddr.port), c.pid) != c.pid for c in conns)


@pytest.mark.slow
def test_training_run_listens_on_loopback_only(corpus, tmp_path):
    # 2 workers, a few steps of the tiny model: the workers hold their process group for seconds
    # (DeepSpeed's set-up, the steps, the last checkpoint) while the sockets are sampled.
    sets = tiny_run(corpus, tmp_path, "sockets", 4, "cluster.num_workers=2")
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    }
    cmd = [sys.executable, "-m", "launch.cli", "train", "configs/tiny-cpu.yaml"]
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen(
            cmd + [a for s in sets for a in ("--set", s)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    root = psutil.Process(proc.pid)
    workers_dir = Path(tmp_path) / "runs" / "sockets" / "workers"
    seen, worker_pids, group_sampled = {}, set(), False
    try:
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            pids = _tree(root)
            if len(worker_pids) < 2 and workers_dir.is_dir():
                worker_pids = {json.loads(f.read_text())["pid"] for f in workers_dir.glob("rank*.json")}
            group_now = len(worker_pids) == 2 and _connected(worker_pids)
            seen.update(_listeners(pids))
            if group_now and worker_pids <= set(pids):
                group_sampled = True
            time.sleep(0.2)
    finally:
        if proc.poll() is None:  # past the deadline: the run and every process it started
            for p in [*root.children(recursive=True), root]:
                p.kill()
        proc.wait()
    output = (tmp_path / "train.log").read_text()
    assert proc.returncode == 0, output[-3000:]
    assert group_sampled, "no sample saw both workers with their process group: the run was too short"
    assert {"gcs_server", "raylet"} <= set(seen.values()), seen  # Ray's own were sampled
    assert {pid for pid, *_ in seen} >= worker_pids, seen  # and the workers'
    exposed = [(name, *key) for key, name in sorted(seen.items()) if not _is_loopback(key[2])]
    assert not exposed, "listening beyond loopback (process, pid, proto, address, port): " + ", ".join(
        map(str, exposed)
    )


# ------------------------------------------------------------------ the rendezvous, per group shape
_RANK = """
import json, os, socket, sys
import psutil, torch, torch.distributed as dist
from trainer.session import Session
os.environ.update(json.loads(sys.argv[1]))
Session().ensure_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)  # the store and gloo's pairs are up
listening = [(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("inet")
             if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)]
print(json.dumps({"sum": t.item(), "listening": listening}), flush=True)
dist.barrier()  # no rank leaves before every rank has looked
dist.destroy_process_group()
"""


class _Ctx:
    """Ray Train's context as `rendezvous_env` reads it: rank `rank` of 2, on one node or on two."""

    def __init__(self, rank: int, one_node: bool):
        self.get_world_rank = lambda: rank
        self.get_world_size = lambda: 2
        self.get_local_rank = lambda: rank if one_node else 0
        self.get_local_world_size = lambda: 2 if one_node else 1
        self.get_node_rank = lambda: 0 if one_node else rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("one_node", [True, False], ids=["one-node", "two-nodes"])
def test_rendezvous_listens_where_the_group_needs(one_node, monkeypatch):
    from cluster.backend import STORE_BIND_ENV, loopback_interface, rendezvous_env

    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(var, raising=False)
    port = _free_port()
    envs = [rendezvous_env(_Ctx(rank, one_node), "127.0.0.1", port, one_node) for rank in (0, 1)]
    if one_node:
        lo = loopback_interface()
        assert envs[0]["GLOO_SOCKET_IFNAME"] == envs[0]["NCCL_SOCKET_IFNAME"] == lo
        assert envs[0][STORE_BIND_ENV] == envs[0]["MASTER_ADDR"] == "127.0.0.1"
    else:  # torch's env:// rendezvous at rank 0's node address, as before
        assert STORE_BIND_ENV not in envs[0] and "GLOO_SOCKET_IFNAME" not in envs[0]
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK, json.dumps(env)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for env in envs
    ]
    try:
        outs = [r.communicate(timeout=120)[0] for r in ranks]
    finally:
        for r in ranks:
            if r.poll() is None:
                r.kill()
    assert [r.returncode for r in ranks] == [0, 0], outs
    reports = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    assert [r["sum"] for r in reports] == [2.0, 2.0]
    exposed = {
        (rank, ip, p) for rank, r in enumerate(reports) for ip, p in r["listening"] if not _is_loopback(ip)
    }
    if one_node:
        assert not exposed, exposed
        assert (0, "127.0.0.1", port) in {(0, ip, p) for ip, p in reports[0]["listening"]}
        return
    # Across nodes rank 0's store must be reachable from the other nodes' ranks, and so are gloo's
    # listeners where the hostname resolves to a network address (here it may be 127.0.0.1); in
    # a plain gloo process nothing else listens: each one is named in MULTI_NODE_OFF_LOOPBACK.
    kinds = {"store" if (rank, p) == (0, port) else "gloo" for rank, _, p in exposed}
    assert "store" in kinds and kinds <= MULTI_NODE_OFF_LOOPBACK.keys(), reports
