"""A Docker Swarm cluster on this machine for development and CI (one Docker daemon per
network namespace standing for a host), and the traveling node image it runs. See
docs/cluster.md; `cluster.py` is the entry point, `plan.py` the pure plan."""

from testbed.emulation.cluster.cluster import (cluster_down, cluster_start_node, cluster_status, cluster_stop_node,
                                               cluster_up, known_clusters, load_plan)
from testbed.emulation.cluster.plan import ClusterPlan, NodePlan, plan_cluster

__all__ = ["cluster_up", "cluster_down", "cluster_status", "cluster_stop_node", "cluster_start_node",
           "known_clusters", "load_plan", "ClusterPlan", "NodePlan", "plan_cluster"]
