"""A local multi-node Ray cluster on this machine: several raylets, each with fake GPUs.

    with local_cluster(nodes=2, gpus_per_node=8) as port:   # Serve's HTTP proxy on the head only
        serve.run(build_app(args), name="app", route_prefix="/")

Each node is a separate raylet (`ray.cluster_utils.Cluster`); a width-k replica's STRICT_PACK
placement group must fit on one of them, as on a real cluster. Everything started is stopped on
exit, however the block ends.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from trident_rs.devtools.local import free_port


@contextmanager
def local_cluster(nodes: int = 2, gpus_per_node: int = 8, cpus_per_node: float = 1) -> Iterator[int]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": cpus_per_node, "num_gpus": gpus_per_node,
                                      "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node, num_gpus=gpus_per_node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        port = free_port()
        try:
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
            yield port
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    finally:
        cluster.shutdown()


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
