"""`testbed cluster up|status|down|stop-node|start-node|image`: a Docker Swarm cluster on
this machine (one daemon per network namespace standing for a host), for development and
CI; docs/cluster.md."""

from __future__ import annotations

import asyncio
import time

import typer
from rich.table import Table

from testbed.cli.console import err, out, print_json

cluster_app = typer.Typer(help="A Docker Swarm cluster on this machine: N daemons, each in its own namespace.",
                          no_args_is_help=True)
image_app = typer.Typer(help="The traveling node image in the cluster image store.", no_args_is_help=True)

_NAME = typer.Option(..., "--name", help="cluster name (1-7 lowercase letters or digits)")
_JSON = typer.Option(False, "--json", help="print only a JSON document on stdout")


def _emit(doc: dict, as_json: bool, text: str) -> None:
    """The JSON document under --json, else one line for people."""
    if as_json:
        print_json(doc)
    else:
        out.print(text, highlight=False)


def _progress(msg: str) -> None:
    err.print(f"[dim]cluster:[/] {msg}", highlight=False)


def _show_status(doc: dict) -> None:
    t = Table("node", "role", "state", "address", "dockerd pid", "host name", title=f"cluster {doc['name']}")
    for n in doc["nodes"]:
        color = "green" if n["state"] == "ready" else "red"
        t.add_row(n["name"], n["role"], f"[{color}]{n['state']}[/]", n["address"], str(n["pid"] or "-"), n["hostname"])
    out.print(t)
    img = doc.get("image") or {}
    out.print(f"datacenter network {doc['subnet']} (host {doc['host_address']}); registry {doc['registry']}",
              highlight=False)
    if img:
        out.print(f"image {img.get('ref')} ({img.get('size_bytes', 0) / 1e6:.0f} MB)", highlight=False)
    for n in doc.get("notes", []):
        err.print(f"[yellow]note:[/] {n}", highlight=False)


@cluster_app.command("up")
def up(
    nodes: int = typer.Option(3, "--nodes", help="number of nodes: 1 manager and N-1 workers"),
    name: str = _NAME,
    timeout_s: float = typer.Option(60.0, "--timeout", help="seconds each daemon may take to answer"),
    pull: bool = typer.Option(True, "--pull/--no-pull",
                              help="pull the node image on every node now (else Swarm pulls it where a service needs it)"),
    one_at_a_time: bool = typer.Option(False, "--pull-sequentially",
                                       help="the nodes pull one after another instead of all at once"),
    as_json: bool = _JSON,
) -> None:
    """Make the cluster: datacenter bridge, one namespace and Docker daemon per node, one
    Swarm, the registry on the manager, the node image pulled by every node."""
    from testbed.emulation.cluster.cluster import cluster_up

    t0 = time.perf_counter()
    doc = asyncio.run(cluster_up(name, nodes, timeout_s=timeout_s, pull=pull, progress=_progress,
                                 pull_sequentially=one_at_a_time))
    if as_json:
        print_json(doc)
        return
    _show_status(doc)
    out.print(f"up in {time.perf_counter() - t0:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in doc['seconds'].items())})",
              highlight=False)


@cluster_app.command("status")
def status(name: str = _NAME, as_json: bool = _JSON) -> None:
    """Each node's role, state (ready/down), address and dockerd pid."""
    from testbed.emulation.cluster.cluster import cluster_status

    doc = asyncio.run(cluster_status(name))
    if as_json:
        print_json(doc)
        return
    _show_status(doc)


@cluster_app.command("down")
def down(name: str = _NAME, as_json: bool = _JSON) -> None:
    """Remove the cluster: processes, namespaces, bridge, veths, iptables chain, cgroups,
    run and data directories (idempotent; works after a crash too)."""
    from testbed.emulation.cluster.cluster import cluster_down

    removed = asyncio.run(cluster_down(name, progress=_progress))
    if as_json:
        print_json({"name": name, "removed": removed})
        return
    kinds: dict[str, int] = {}
    for r in removed:
        kind = r.split(" ", 1)[0] if not r.startswith("iptables") else "iptables"
        kinds[kind] = kinds.get(kind, 0) + 1
    out.print(f"cluster {name}: removed " + ", ".join(f"{n} {k}" for k, n in kinds.items())
              if removed else f"cluster {name}: nothing to remove", highlight=False)


@cluster_app.command("stop-node")
def stop_node(node: str = typer.Argument(..., help="node name (n1 is the manager)"), name: str = _NAME,
              as_json: bool = _JSON) -> None:
    """Kill a node as a host losing power: SIGKILL its dockerd and everything it runs."""
    from testbed.emulation.cluster.cluster import cluster_stop_node

    doc = asyncio.run(cluster_stop_node(name, node))
    _emit(doc, as_json, f"node {node}: killed dockerd {doc['dockerd_pid']} and {len(doc['killed'])} processes in all")


@cluster_app.command("start-node")
def start_node(node: str = typer.Argument(..., help="node name"), name: str = _NAME,
               timeout_s: float = typer.Option(60.0, "--timeout", help="seconds to wait until the swarm sees it ready"),
               as_json: bool = _JSON) -> None:
    """Start a stopped node again; it rejoins the swarm."""
    from testbed.emulation.cluster.cluster import cluster_start_node

    doc = asyncio.run(cluster_start_node(name, node, timeout_s=timeout_s))
    _emit(doc, as_json, f"node {node}: dockerd {doc['dockerd_pid']}, ready in the swarm after {doc['seconds']:.1f} s")


@image_app.command("build")
def image_build(as_json: bool = _JSON) -> None:
    """Push this checkout's node image into the store (only layers it lacks); a cluster's
    registry serves it from there. With no cluster up, what no tag names any more is deleted."""
    from testbed.emulation.cluster.cluster import known_clusters
    from testbed.emulation.cluster.image import push_image
    from testbed.emulation.cluster.registry import RegistryClient, collect_garbage, serve

    with serve() as url:
        img = push_image(RegistryClient(url))
    doc = img.to_json()
    doc["freed_bytes"] = 0 if known_clusters() else collect_garbage()
    if as_json:
        print_json(doc)
        return
    for la in doc["layers"]:
        verb = "pushed" if la["pushed"] else "kept"
        out.print(f"  {la['name']:9} {la['size_bytes'] / 1e6:8.1f} MB  {verb} in {la['seconds']:.1f} s", highlight=False)
    out.print(f"{img.repo}@{img.digest} ({img.size_bytes / 1e6:.0f} MB) in {img.seconds:.1f} s; "
              f"{doc['freed_bytes'] / 1e6:.0f} MB of older builds freed", highlight=False)


@image_app.command("rm")
def image_rm(as_json: bool = _JSON) -> None:
    """Remove the image store (every pushed layer); no cluster may be up."""
    from testbed.emulation.cluster.cluster import known_clusters
    from testbed.emulation.cluster.image import remove_store

    if known_clusters():
        from testbed.errors import ResourceError

        raise ResourceError(f"clusters are up ({', '.join(known_clusters())}); their registries serve the store: "
                            "`testbed cluster down --name NAME` first")
    removed = remove_store()
    _emit({"removed": removed}, as_json, "removed the image store" if removed else "no image store")


def register(app: typer.Typer) -> None:
    cluster_app.add_typer(image_app, name="image")
    app.add_typer(cluster_app, name="cluster")
