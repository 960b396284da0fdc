"""`latticed`: parse flags, load config, lock the state dir, run the daemon, handle signals.

Exit codes: 0 clean stop (SIGINT/SIGTERM), 1 cannot start (state dir locked, socket in
use, listen address taken), 2 bad config or usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from latticed import __version__, statedir
from latticed import config as config_mod

if TYPE_CHECKING:
    from latticed.node import Node

log = logging.getLogger("latticed")

SHUTDOWN_GRACE_S = 4.0  # the contract is "stops within 5 s"; leave a margin


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latticed",
        description="Lattice node daemon: joins the mesh, serves the local RPC socket.",
        epilog="Settings come from defaults < TOML file < LATTICE_* environment < flags. "
               "`latticed --print-config` shows the result and where each value came from.")
    p.add_argument("--config", type=Path, help="TOML config file (default: $LATTICE_CONFIG, "
                   "else $XDG_CONFIG_HOME/lattice/latticed.toml if it exists)")
    p.add_argument("--state-dir", type=Path, help="identity, lock, socket and state")
    p.add_argument("--socket", type=Path, help="local RPC socket path")
    p.add_argument("--listen", action="append", metavar="MULTIADDR",
                   help="listen address, repeatable (e.g. /ip4/0.0.0.0/tcp/4001)")
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR",
                   help="bootstrap peer /ip4/…/tcp/…/p2p/<id>, repeatable")
    p.add_argument("--no-mdns", action="store_true", help="do not use mDNS on the LAN")
    p.add_argument("--name", help="human-readable node name")
    p.add_argument("--log-level", help="debug | info | warning | error")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective config as TOML and exit")
    p.add_argument("--print-peer-id", action="store_true",
                   help="print this node's peer id (creating its identity on first use) "
                        "and exit: what others need in a /p2p/<id> bootstrap address")
    p.add_argument("--version", action="version", version=f"latticed {__version__}")
    return p


def flags_from_args(args: argparse.Namespace) -> dict[str, object]:
    return {
        "node.state_dir": args.state_dir,
        "node.socket": args.socket,
        "node.listen": args.listen,
        "node.bootstrap": args.bootstrap,
        "node.mdns": False if args.no_mdns else None,
        "node.name": args.name,
        "log.level": args.log_level,
    }


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def main(argv: list[str] | None = None) -> int:
    from latticed.governor import cap_blas_threads
    cap_blas_threads()  # before numpy loads: job compute stays on the governed threads
    args = build_parser().parse_args(argv)
    try:
        cfg = config_mod.load(config_file=args.config, flags=flags_from_args(args))
    except config_mod.ConfigError as e:
        print(f"latticed: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(cfg.to_toml())
        return 0
    try:
        statedir.prepare(cfg.state_dir)
        if args.print_peer_id:
            identity, _ = statedir.load_or_create_identity(cfg.state_dir)
            print(identity.peer_id)
            return 0
        lock_fd = statedir.acquire_lock(cfg.state_dir)
    except statedir.StateDirError as e:
        print(f"latticed: {e}", file=sys.stderr)
        return 1
    setup_logging(cfg["log.level"])
    try:
        return trio.run(_run, cfg)
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130
    finally:
        os.close(lock_fd)


async def _run(cfg: config_mod.Config) -> int:
    from latticed.node import Node, StartupError

    try:
        node = Node.create(cfg)
    except statedir.StateDirError as e:
        print(f"latticed: {e}", file=sys.stderr)
        return 1
    code = 0
    try:
        await _serve_until_signalled(node)
    except* StartupError as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        print(f"latticed: cannot start: {first}", file=sys.stderr)
        code = 1
    log.info("stopped")
    return code


async def _serve_until_signalled(node: Node) -> None:
    from latticed.node import STOPPING, serve_node

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("received %s, stopping", signal.Signals(signum).name)
                    node.set_state(STOPPING)
                    with trio.move_on_after(0.5):  # let subscribers see "stopping"
                        await node.bus.wait_drained()
                    nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE_S
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            await serve_node(node)
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    sys.exit(main())
