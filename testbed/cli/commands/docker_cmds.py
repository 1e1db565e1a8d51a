"""`testbed image build|rm` (the node image, no registry needed) and `testbed compose FILE`
(a compose/Swarm file of a scenario)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from testbed.cli.console import err, out, print_json

image_app = typer.Typer(help="The docker node image (made locally; no registry).", no_args_is_help=True)


@image_app.command("build")
def image_build(
    force: bool = typer.Option(False, "--force", help="rebuild even when an image for this host exists"),
    as_json: bool = typer.Option(False, "--json", help="print only a JSON document on stdout"),
) -> None:
    """Make testbed-node:local: `docker import` of a skeleton root filesystem; containers
    bind-mount the host's /usr, /etc, Python and checkout read-only (docs/emulation.md, "Docker and Swarm")."""
    from testbed.emulation.docker.image import build_image, docker_client, host_mounts

    t0 = time.perf_counter()
    info, built = build_image(docker_client(), force=force)
    doc = {"image": info.name, "id": info.id, "size_bytes": info.size_bytes, "built": built,
           "mounts": [m.path for m in host_mounts()], "seconds": round(time.perf_counter() - t0, 3)}
    if as_json:
        print_json(doc)
        return
    verb = "built" if built else "up to date:"
    out.print(f"{verb} {info.name} ({info.id[7:19]}, {info.size_bytes} bytes) in {doc['seconds']:.2f} s; "
              f"containers mount read-only: {', '.join(doc['mounts'])}", highlight=False)


@image_app.command("rm")
def image_rm(as_json: bool = typer.Option(False, "--json", help="print only a JSON document on stdout")) -> None:
    """Remove testbed-node:local (fails while a container uses it: `testbed down --all` first)."""
    from testbed.emulation.docker.image import IMAGE, docker_client, remove_image

    removed = remove_image(docker_client())
    if as_json:
        print_json({"image": IMAGE, "removed": removed})
        return
    out.print(f"removed {IMAGE}" if removed else f"{IMAGE} does not exist", highlight=False)


def compose(
    file: Path = typer.Argument(..., help="topology YAML file"),
    out_dir: Path = typer.Option(Path("compose"), "--out-dir", help="where <name>.yml and its state directory go"),
    run: str | None = typer.Option(None, "--run", help="run id (default: from the topology's name)"),
    seed: int | None = typer.Option(None, "--seed", help="override the file's seed"),
    as_json: bool = typer.Option(False, "--json", help="print only a JSON document on stdout"),
) -> None:
    """Write compose/<name>.yml: the scenario for `docker-compose up` and `docker stack deploy`."""
    from testbed.composition.deployment import write_scenario
    from testbed.model.names import check_run_id

    scen = write_scenario(file, out_dir, run_id=check_run_id(run) if run else None, seed=seed)
    if as_json:
        print_json(scen.to_json())
        return
    for w in scen.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    f = scen.compose_file
    out.print(f"wrote {f} ({len(scen.devices)} devices, run id {scen.run_id}); state in {scen.state_dir}\n"
              f"  one host:  docker-compose -p tb-{scen.run_id} -f {f} up --abort-on-container-exit --exit-code-from server\n"
              f"  Swarm:     docker node update --label-add testbed.server=true --label-add testbed.device=true NODE\n"
              f"             docker stack deploy -c {f} tb-{scen.run_id}\n"
              f"  result:    {scen.state_dir}/out/result.json", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(image_app, name="image")
    app.command()(compose)
