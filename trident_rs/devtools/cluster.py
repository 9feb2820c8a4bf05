"""A local multi-node Ray cluster on this machine: several raylets, each with fake GPUs.

    with local_cluster(nodes=2, gpus_per_node=8) as port:   # Serve's HTTP proxy on the head only
        serve.run(build_app(args), name="app", route_prefix="/")

Each node is a separate raylet (`ray.cluster_utils.Cluster`); a width-k replica's STRICT_PACK
placement group must fit on one of them, as on a real cluster. Everything started is stopped on
exit, however the block ends.

`node_cluster(...)` is the same with a handle (`LocalCluster`) that removes and re-adds worker
nodes while Serve runs (issue 20: a node lost with its replicas and its objects):

    with node_cluster(workers=3, gpus_per_node=2, head_gpus=0) as lc:
        victim = lc.removable()[0]          # a worker hosting no Ingress/Controller replica
        lc.remove(victim); ...; lc.add()    # its raylet killed; later a fresh node of the same size
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from trident_rs.devtools.local import free_port


@contextmanager
def local_cluster(nodes: int = 2, gpus_per_node: int = 8, cpus_per_node: float = 1) -> Iterator[int]:
    with node_cluster(workers=nodes - 1, gpus_per_node=gpus_per_node, cpus_per_node=cpus_per_node) as lc:
        yield lc.port


# Serve actors that must not be on a node a test removes: the app's request path lives there
PINNED_DEPLOYMENTS = ("Ingress", "Controller")
# A custom resource only the head node has: `control_resources={HEAD_RESOURCE: 0.01}` in an app's
# config puts its Ingress and Controller there, so every worker node is removable
HEAD_RESOURCE = "trident_head"


class LocalCluster:
    """A running `node_cluster`: its HTTP port and its worker nodes, which can be removed and added."""

    def __init__(self, cluster: Any, port: int, gpus_per_node: int, cpus_per_node: float):
        self.cluster, self.port = cluster, port
        self.gpus_per_node, self.cpus_per_node = gpus_per_node, cpus_per_node
        self.removed: list[str] = []  # node ids removed, in order
        self.added: list[str] = []  # node ids added after the start

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def workers(self) -> list[Any]:
        """The live worker nodes (`ray._private.node.Node`), oldest first."""
        return list(self.cluster.worker_nodes)

    def removable(self, app: str | None = None) -> list[Any]:
        """Worker nodes that host none of `PINNED_DEPLOYMENTS`' replicas (of `app`, or of any app)."""
        pinned = set(actor_nodes(PINNED_DEPLOYMENTS, app).values())
        return [n for n in self.workers() if n.node_id not in pinned]

    def remove(self, node: Any) -> str:
        """Kill the node's raylet and everything on it (replicas, objects); its node id."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.removed.append(node.node_id)
        return node.node_id

    def add(self) -> str:
        """Start a fresh worker node of the configured size; its node id. (Main thread only: Ray
        sets a SIGTERM handler for each node; ours, which stops the whole cluster, is put back.)"""
        node = self.cluster.add_node(num_cpus=self.cpus_per_node, num_gpus=self.gpus_per_node)
        _stop_on_sigterm()
        self.cluster.wait_for_nodes()
        self.added.append(node.node_id)
        return node.node_id


@contextmanager
def node_cluster(workers: int = 1, gpus_per_node: int = 8, cpus_per_node: float = 1,
                 head_gpus: int | None = None, head_cpus: float | None = None) -> Iterator[LocalCluster]:
    """A head node (`head_gpus`, default `gpus_per_node`) and `workers` worker raylets, Ray
    connected, Serve's HTTP proxy on the head only. Everything is stopped on exit."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    hg = gpus_per_node if head_gpus is None else head_gpus
    old = signal.getsignal(signal.SIGTERM)
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": cpus_per_node if head_cpus is None else head_cpus,
                                      "num_gpus": hg, "include_dashboard": False,
                                      "resources": {HEAD_RESOURCE: 1}})
    try:
        for _ in range(workers):
            cluster.add_node(num_cpus=cpus_per_node, num_gpus=gpus_per_node)
        _stop_on_sigterm()  # SIGTERM: leave this block (stopping everything), not only the last node
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        try:
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
            yield LocalCluster(cluster, port, gpus_per_node, cpus_per_node)
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    finally:
        try:
            cluster.shutdown()
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


def _sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _stop_on_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)


def _replica_actors(deployments: tuple[str, ...], app: str | None) -> list[tuple[str, dict]]:
    """(actor name, Ray's actor info) of the live Serve replicas of these deployments."""
    from ray._private.state import actors

    out = []
    for info in actors().values():
        name = info.get("Name") or ""
        if info.get("State") != "ALIVE" or not name.startswith("SERVE_REPLICA::"):
            continue
        parts = name[len("SERVE_REPLICA::"):].split("#")
        if len(parts) >= 2 and parts[1] in deployments and (app is None or parts[0] == app):
            out.append((name, info))
    return out


def actor_nodes(deployments: tuple[str, ...], app: str | None = None) -> dict[str, str]:
    """Live Serve replica actors of these deployments -> their Ray node id."""
    return {name: (info.get("Address") or {}).get("NodeID", "") for name, info in _replica_actors(deployments, app)}


def actor_pids(deployments: tuple[str, ...], app: str | None = None) -> dict[str, int]:
    """Live Serve replica actors of these deployments -> their process id (on this machine)."""
    return {name: int(info["Pid"]) for name, info in _replica_actors(deployments, app) if info.get("Pid")}


def placement_groups_by_node() -> list[dict[str, Any]]:
    """Every live placement group with the Ray node of each of its bundles."""
    from ray.util import placement_group_table

    out = []
    for pg_id, pg in placement_group_table().items():
        if pg.get("state") != "CREATED":
            continue
        nodes = pg.get("bundles_to_node_id") or {}
        out.append({"id": pg_id, "strategy": pg.get("strategy"), "bundles": len(pg.get("bundles") or {}),
                    "nodes": sorted(set(nodes.values()))})
    return out
