"""How often docker loses count of a network's endpoints at teardown, per removal order.

Each cycle makes a replica of a docker cell (an internal bridge network, 21 idle node
containers with static addresses, the node image's host mounts), then tears it down:

- `parallel`: `rm -f` of every container, 8 at a time, then `network rm` (the old teardown);
- `detach-first`: disconnect the containers one at a time, then `rm -f` 8 at a time, then
  `network rm` (the order of testbed/emulation/docker/cleanup.py);
- `testbed`: the testbed's own teardown, `remove_docker_run(run)` (the cell labelled
  testbed.run=<a fresh run id>).

A cycle "leaks" when the network still refuses removal ("has active endpoints") 2 s later;
such a network stays until the docker daemon restarts. Prints leaks per strategy side by
side. Networks use 198.19.192.0/19 (outside the cell and the daemon's pools), one /27 per
cycle, label testbed.bench=teardown; leaked ones are listed at the end.

Measured on this 2-core VM (docker 20.10.24, shared load): parallel 1 leak in 25 cycles
(teardown 2.3 s mean), detach-first 0 in 50 (3.0 s), testbed 0 in 10 (3.2 s).

Usage (root, a docker daemon, the node image): flock /tmp/tb-docker.lock
    .venv/bin/python bench/docker_teardown.py [--cycles 25] [--strategies parallel,detach-first,testbed]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import docker
import docker.errors
import docker.types

from testbed.emulation.docker.cleanup import remove_docker_run
from testbed.emulation.docker.image import IMAGE, build_image, docker_client, host_mounts
from testbed.emulation.docker.spec import RUN_LABEL
from testbed.errors import ResourceError

LABEL = {"testbed.bench": "teardown"}
POOL = ipaddress.IPv4Network("198.19.192.0/19")


def make_cell(client: docker.DockerClient, name: str, subnet: ipaddress.IPv4Network, n: int,
              labels: dict[str, str] = LABEL):
    hosts = list(subnet.hosts())
    ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=str(subnet), gateway=str(hosts[-1]))])
    net = client.networks.create(name, driver="bridge", internal=True, labels=labels, ipam=ipam,
                                 options={"com.docker.network.bridge.name": f"{name}br",
                                          "com.docker.network.bridge.inhibit_ipv4": "true"})
    api = client.api
    mounts = [docker.types.Mount(m.path, m.path, type="bind", read_only=True) for m in host_mounts()]

    def start(k: int):
        hc = api.create_host_config(mounts=mounts, init=True, network_mode=name, cap_add=["NET_ADMIN"],
                                    nano_cpus=500_000_000, mem_limit="256m")
        nc = api.create_networking_config({name: api.create_endpoint_config(ipv4_address=str(hosts[k]))})
        c = api.create_container(IMAGE, command=["/usr/bin/sleep", "infinity"], name=f"{name}-{k}", labels=labels,
                                 host_config=hc, networking_config=nc, detach=True)
        api.start(c["Id"])
        return client.containers.get(c["Id"])

    with ThreadPoolExecutor(8) as ex:
        return net, list(ex.map(start, range(n)))


def teardown(strategy: str, net, containers, client: docker.DockerClient, run: str) -> bool:
    """True when the network was removed (no leak)."""
    if strategy == "testbed":
        try:
            asyncio.run(remove_docker_run(run, client))
            return True
        except ResourceError as e:
            print(f"  {e}", flush=True)
            return False
    if strategy == "detach-first":
        for c in containers:
            net.disconnect(c)
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda c: c.remove(force=True), containers))
    for wait_s in (0.0, 2.0):
        time.sleep(wait_s)
        try:
            net.remove()
            return True
        except docker.errors.APIError:
            continue
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=25)
    ap.add_argument("--containers", type=int, default=21)
    ap.add_argument("--strategies", default="parallel,detach-first,testbed")
    args = ap.parse_args()
    client = docker_client(timeout_s=120)
    build_image(client)
    subnets = POOL.subnets(new_prefix=27)
    taken = {c["Subnet"] for n in client.networks.list() for c in (client.networks.get(n.id).attrs["IPAM"]["Config"] or [])}
    results: dict[str, tuple[int, float]] = {}
    leaked: list[str] = []
    for strategy in args.strategies.split(","):
        leaks, secs = 0, 0.0
        for i in range(args.cycles):
            subnet = next(s for s in subnets if str(s) not in taken)
            name = f"benchtd{strategy[0]}{i}"
            run = "b" + uuid.uuid4().hex[:6]  # labelled as a run only for the testbed's own teardown
            labels = LABEL | {RUN_LABEL: run} if strategy == "testbed" else LABEL
            net, containers = make_cell(client, name, subnet, args.containers, labels)
            t0 = time.monotonic()
            ok = teardown(strategy, net, containers, client, run)
            secs += time.monotonic() - t0
            leaks += not ok
            if not ok:
                leaked.append(name)
            print(f"{strategy} cycle {i}: {'ok' if ok else 'LEAK'}", flush=True)
        results[strategy] = (leaks, secs / args.cycles)
    print(f"\n{'strategy':<14} {'leaks':>8} {'teardown s (measured, mean)':>28}")
    for strategy, (leaks, mean_s) in results.items():
        print(f"{strategy:<14} {leaks:>3} / {args.cycles:<3} {mean_s:>28.2f}")
    if leaked:
        print(f"leaked networks (until the daemon restarts): {', '.join(leaked)}")


if __name__ == "__main__":
    main()
