"""equilibriumd: the node agent.

\b
  run --config FILE [--cgroup PATH]   standalone mode, in the foreground
  teardown                            detach and unpin everything the agent made
  check-config FILE                   validate a config file and exit
  coordinate --kubernetes | --dir PATH
                                      the cross-node coordinator (no root)
"""

from __future__ import annotations

import os
import sys

import click

from .. import config as cfg
from .. import logs
from ..datapath import libbpf, lifecycle
from .options import PIN_DIR


def _check_metrics_addr(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value.strip().lower() in ("", "off"):
        return value   # prometheus_client (and with it ssl, ~5 MB) only when /metrics is served
    from ..metrics import parse_addr

    try:
        parse_addr(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


@click.group(help=__doc__)
def cli() -> None:
    pass


@cli.command(help="Run the agent in the foreground (SIGHUP reloads the config; SIGTERM exits leaving "
                  "the datapath in place).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="standalone config (YAML)")
@click.option("--kubernetes", is_flag=True, help="discover opted-in Services and EndpointSlices from the cluster")
@click.option("--node-name", envvar="NODE_NAME", default=None,
              help="this node's name (with --kubernetes; with --coordinator, its name on the channel)  "
                   "[env: NODE_NAME; default with --coordinator: the hostname]")
@click.option("--cgroup", default=None, help="cgroup v2 directory to attach to  [default: the cgroup2 root]")
@click.option("--reload-datapath", is_flag=True, help="rebuild and re-attach the BPF programs even if current")
@click.option("--telemetry/--no-telemetry", default=True, show_default=True,
              help="attach the telemetry programs (sockops, cgroup_skb, tracepoint)")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--metrics-addr", default="127.0.0.1:9500", show_default=True, callback=_check_metrics_addr,
              help="serve Prometheus /metrics on HOST:PORT ([v6]:PORT for IPv6); \"\" or \"off\" disables")
@click.option("--metrics-backends", default=128, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="backends with /metrics series of their own (~80 samples each), the first services' in "
                   "config order; every service has its own series whatever this is")
@click.option("--state-file", default=None, metavar="PATH",
              help="where the learned state is saved and resumed from (\"off\": neither)  "
                   "[default: next to the agent's lock, $EQUILIBRIUM_RUN_DIR/agent-<pin dir hash>.state]")
@click.option("--state-every", default=None, type=click.FloatRange(min=0.1), metavar="SECONDS",
              # the default is agent.persist.SAVE_EVERY (imported with the agent, not here)
              help="save the learned state this often, and at a clean exit  [default: 10]")
@click.option("--coordinator", envvar="EQUILIBRIUM_COORDINATOR", default="off", show_default=True,
              metavar="off|kubernetes|dir:PATH",
              help="follow the cross-node coordinator (`equilibriumd coordinate`) through ConfigMaps in "
                   "$POD_NAMESPACE, or a directory shared with a local one; a recommendation is followed only "
                   "while fresh and worth following by this node's own observations  [env: "
                   "EQUILIBRIUM_COORDINATOR]")
@click.option("--coordination-period", default=10.0, show_default=True, type=click.FloatRange(0.1, 3600),
              metavar="SECONDS", help="seconds between summaries published and recommendations read")
@PIN_DIR
def run(config_path: str | None, kubernetes: bool, node_name: str | None, cgroup: str | None,
        reload_datapath: bool, telemetry: bool, log_level: str, metrics_addr: str, metrics_backends: int,
        state_file: str | None, state_every: float | None, coordinator: str, coordination_period: float,
        pin_dir: str) -> None:
    from ..agent.daemon import Agent, AgentOptions
    from ..agent.lock import AlreadyRunning
    from ..agent.reconcile import CapacityError

    if kubernetes and not node_name:
        raise click.UsageError("--kubernetes needs this node's name: --node-name or $NODE_NAME")
    if not config_path and not kubernetes:
        raise click.UsageError("--config FILE (or --kubernetes) is required")
    if coordinator not in ("off", "kubernetes") and not (coordinator.startswith("dir:") and len(coordinator) > 4):
        raise click.BadParameter("expected off, kubernetes or dir:PATH, not %r" % coordinator,
                                 param_hint="--coordinator")
    logs.setup(log_level)
    log = logs.get("equilibriumd")
    try:
        cg = lifecycle.check_cgroup(cgroup or lifecycle.cgroup2_root())
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    if os.geteuid() != 0:
        raise click.ClickException("equilibriumd run needs root (BPF programs and maps)")
    opts = AgentOptions(config_path or "", cg, pin_dir, reload_datapath, telemetry, metrics_addr=metrics_addr,
                        metrics_backends=metrics_backends, kubernetes=kubernetes, node_name=node_name or "",
                        state_file=state_file, coordinator=coordinator, coordination_period=coordination_period)
    if state_every is not None:
        opts.state_every = state_every
    agent = Agent(opts)
    agent.install_signals()
    try:
        agent.run()
    except cfg.ConfigError as e:
        log.error("config_invalid", error=str(e))
        sys.exit(2)
    except (AlreadyRunning, CapacityError, lifecycle.LoadError, libbpf.BpfError, OSError) as e:
        log.error("start_failed", error=str(e))
        sys.exit(1)
    finally:
        agent.close()


@cli.command(help="Detach every program and remove every pin the agent made.")
@click.option("--force", is_flag=True, help="even while an agent is running on this pin directory")
@PIN_DIR
def teardown(force: bool, pin_dir: str) -> None:
    from ..agent.lock import holder

    pid = holder(pin_dir)
    if pid and not force:
        raise click.ClickException("an agent (pid %s) is running on %s; stop it first or pass --force" % (pid, pin_dir))
    if not os.path.isdir(pin_dir):
        click.echo("nothing to remove: %s does not exist" % pin_dir)
        return
    try:
        rep = lifecycle.teardown(pin_dir)
    except (libbpf.BpfError, OSError) as e:
        raise click.ClickException("teardown failed: %s" % e) from None
    click.echo("detached %d links, removed %d map pins from %s%s" % (
        len(rep.links), len(rep.maps), pin_dir, "".join("\n  " + o for o in rep.others)))
    from ..agent import persist

    state = persist.default_path(pin_dir)   # learned weights of a datapath that is gone
    if os.path.exists(state):
        os.unlink(state)
        click.echo("removed the learned state %s" % state)


@cli.command("check-config", help="Validate a config file; prints what it would run.")
@click.argument("path", type=click.Path(dir_okay=False))
def check_config(path: str) -> None:
    try:
        c = cfg.load_apart(path)   # as the agent reads it: a file that breaks the parser is an error too
    except cfg.ConfigError as e:
        click.echo("invalid: %s" % e, err=True)
        sys.exit(2)
    n = sum(len(s.backends) for s in c.services)
    click.echo("ok: %d services, %d backends, policy %s, tick %gs" % (len(c.services), n, c.policy, c.tick))
    for s in c.services:  # what each service will run: overrides and defaults resolved
        click.echo("  %s  %s/%s  %d backends  policy %s  balance %s"
                   % (s.name, s.frontend, s.protocol, len(s.backends), c.policy_of(s), c.balance_of(s)))


def main() -> None:
    from .coordinate import coordinate

    cli.add_command(coordinate)
    cli()


if __name__ == "__main__":
    main()
