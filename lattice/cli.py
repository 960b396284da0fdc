"""`lattice`: the command line. Presentation over `lattice.client` — no logic here.

`--json` prints exactly one JSON document on stdout; otherwise a readable table.
Exit codes: 0 ok, 1 the daemon is unreachable or reported an error, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lattice.api.errors import LatticeError
from lattice.client import DaemonNotRunningError, connect


def _table(rows: list[list[str]], headers: list[str]) -> str:
    cells = [headers] + rows
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(headers))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*headers).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
    out += [fmt.format(*map(str, r)).rstrip() for r in rows]
    return "\n".join(out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes_hex": value.hex()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _emit_json(value: Any) -> None:
    json.dump(_jsonable(value), sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + (f"{h}h " if h or d else "") + f"{m}m {s}s"


def _short(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 20 else f"{peer_id[:8]}…{peer_id[-8:]}"


# -- commands -----------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    with connect(args.socket) as c:
        st = c.status()
    if args.json:
        _emit_json(st)
        return 0
    lines = [
        ("peer id", st["peer_id"]),
        ("name", st.get("name") or "-"),
        ("version", st["version"]),
        ("state", st["state"]),
        ("uptime", _duration(st["uptime_s"])),
        ("peers", str(st["peers"])),
        ("listen", "\n".join(st["listen_addrs"]) or "-"),
        ("observed", "\n".join(st["observed_addrs"]) or "-"),
    ]
    reach = st.get("reachability")
    if isinstance(reach, dict):
        verdict = reach.get("reachability", "unknown")
        if verdict == "private" and reach.get("nat") not in (None, "unknown", "none"):
            verdict += f" (behind a {reach['nat']} NAT"
            verdict += {"reject": " that rejects", "drop": " that drops"}.get(
                reach.get("filtering") or "", "") + ")"
        elif reach.get("reason") and verdict == "unknown":
            verdict += f" ({reach['reason']})"
        via = ", ".join(reach.get("reachable_via") or []) or "-"
        lines.append(("reachable", f"{verdict}; via {via}"))
        if reach.get("public_addrs"):
            lines.append(("public", "\n".join(reach["public_addrs"])))
        for r in reach.get("reservations") or []:
            lines.append(("relay", r.get("addr") or r.get("relay")))
        relay = reach.get("relay_service") or {}
        if relay.get("active"):
            lines.append(("relaying", f"{relay.get('reservations', 0)} reservations, "
                                      f"{relay.get('circuits', 0)} circuits"))
        for peer, why in sorted((reach.get("relayed_peers") or {}).items()):
            lines.append(("relayed", f"{peer}: {why}"))
    gov = st.get("governor")
    if isinstance(gov, dict):
        lines.append(("governor", gov["summary"]))
        if gov.get("transfer_reasons"):
            lines.append(("transfers", gov["transfers"]))
    for extra in ("dht", "state_sync"):
        if isinstance(st.get(extra), dict):
            flat = {k: v for k, v in st[extra].items() if not isinstance(v, (dict, list))}
            lines.append((extra, ", ".join(f"{k}={v}" for k, v in flat.items())))
    lines.append(("socket", st["socket"]))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        first, *rest = value.split("\n")
        print(f"{key:<{width}}  {first}")
        for r in rest:
            print(f"{'':<{width}}  {r}")
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    with connect(args.socket) as c:
        peers = c.peers()
    if args.json:
        _emit_json(peers)
        return 0
    if not peers:
        print("no connected peers")
        return 0
    rows = [[p["peer_id"], p["direction"], p["connection"],
             "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.1f}", ", ".join(p["addrs"])]
            for p in peers]
    print(_table(rows, ["PEER ID", "DIRECTION", "CONNECTION", "RTT MS", "ADDRS"]))
    for p in peers:
        if p.get("why_relayed"):
            print(f"{p['peer_id']} relayed: {p['why_relayed']}")
    return 0


def cmd_peers_connect(args: argparse.Namespace) -> int:
    with connect(args.socket, timeout=args.timeout + 5) as c:
        result = c.connect_peer(args.multiaddr, timeout=args.timeout)
    if args.json:
        _emit_json(result)
    else:
        print(f"connected to {result['peer_id']} in {result['elapsed_ms']:.0f} ms")
    return 0


def cmd_members(args: argparse.Namespace) -> int:
    with connect(args.socket) as c:
        members = c.members()
    if args.json:
        _emit_json(members)
        return 0
    if not members:
        print("no members known yet")
        return 0
    rows = []
    for pid, m in sorted(members.items(), key=lambda kv: (not kv[1].get("alive"), kv[0])):
        # age: since the failure detector's last sign of life (else the heartbeat's)
        age = m.get("age")
        caps = m.get("capabilities") or {}
        rows.append([pid, m.get("name") or "-", "alive" if m.get("alive") else "dead",
                     "-" if age is None else f"{max(0, age):.0f}s ago",
                     m.get("version") or "-", str(caps.get("cpus", "-")),
                     m.get("reachability") or "-"])
    print(_table(rows, ["PEER ID", "NAME", "LIVENESS", "LAST SEEN", "VERSION", "CPUS", "REACHABILITY"]))
    return 0


def cmd_state_get(args: argparse.Namespace) -> int:
    with connect(args.socket) as c:
        value = c.state_get(args.path)
    if args.json or not isinstance(value, (str, int, float)):
        _emit_json(value)
    else:
        print(value)
    return 0


def cmd_state_watch(args: argparse.Namespace) -> int:
    prefix = args.path.strip("/")
    with connect(args.socket) as c:
        with c.subscribe(["state"]) as events:
            for ev in events:
                if ev["event"] == "snapshot":
                    continue
                if ev.get("path", "").startswith(prefix):
                    print(json.dumps(_jsonable(ev), sort_keys=True, default=str), flush=True)
    return 0


def _parse_value(text: str, as_json: bool) -> Any:
    if not as_json:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"lattice: VALUE is not JSON ({e}); drop --value-json to store it as text")


def cmd_dht_put(args: argparse.Namespace) -> int:
    with connect(args.socket) as c:
        r = c.dht_put(args.key, _parse_value(args.value, args.value_json), args.ttl)
    if args.json:
        _emit_json(r)
    else:
        print(f"stored {r['key']} at {r['stored_at']} peers ({r['hops']} hops), "
              f"expires in {args.ttl:g} s")
    return 0


def cmd_dht_get(args: argparse.Namespace) -> int:
    with connect(args.socket) as c:
        r = c.dht_get(args.key, fresh=args.fresh)
    if args.json:
        _emit_json(r)
        return 0
    if not r["records"]:
        print(f"no live records under {r['key']}", file=sys.stderr)
        return 1
    now = time.time()
    rows = [[rec["publisher"], json.dumps(_jsonable(rec["value"]), default=str)[:80],
             f"{max(0, rec['expires_at'] - now):.0f}s"] for rec in r["records"]]
    print(_table(rows, ["PUBLISHER", "VALUE", "EXPIRES IN"]))
    return 0


def cmd_peers_find(args: argparse.Namespace) -> int:
    with connect(args.socket) as c:
        r = c.find_peer(args.peer_id)
    if args.json:
        _emit_json(r)
    else:
        print("\n".join(r["addrs"]) or "(found, but it published no addresses)")
    return 0


def cmd_jobs_submit(args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {"task": args.task, "min_peers": args.min_peers}
    for name in ("steps", "sync_every", "schedule", "algorithm", "partition", "compression",
                 "weighting", "correction", "seed", "batch", "lr"):
        value = getattr(args, name)
        if value is not None:
            spec[name] = value
    with connect(args.socket) as c:
        r = c.submit_job(spec, allow=args.allow or None, private=args.private or None)
    _print_submitted(args, r, spec=spec)
    return 0


def _print_submitted(args: argparse.Namespace, r: dict[str, Any], **shown: Any) -> None:
    if args.json:
        _emit_json({**r, **shown})
    else:
        print(r["job_id"])
        if "token" in r:  # hand it to the peers that may join: lattice jobs join ID --token T
            print(r["token"])


def _access_arguments(p: argparse.ArgumentParser) -> None:
    """Who may take part in a submitted job (proto/jobs.md, "Access")."""
    p.add_argument("--allow", action="append", metavar="PEER_ID",
                   help="only this peer may take part (repeatable)")
    p.add_argument("--private", action="store_true",
                   help="only peers given the token (printed after the id) may take part")


def cmd_jobs_join(args: argparse.Namespace) -> int:
    with connect(args.socket) as c:
        r = c.join_job(args.job_id, token=args.token)
    print("joined" if r["joined"] else "already taking part")
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with connect(args.socket) as c:
        jobs = c.jobs()
    if args.json:
        _emit_json(jobs)
        return 0
    if not jobs:
        print("no jobs")
        return 0
    rows = [[j["id"], j.get("task") or j.get("kind") or "-", j.get("status") or "-",
             f"{j.get('steps', 0)}/{j.get('steps_total', 0)}",
             "-" if j.get("accuracy") is None else f"{100 * j['accuracy']:.1f}%",
             str(len(j.get("peers") or {})), (j.get("model") or "-")[:16]] for j in jobs]
    print(_table(rows, ["JOB ID", "TASK", "STATUS", "STEPS", "ACCURACY", "PEERS", "MODEL"]))
    return 0


def cmd_jobs_get(args: argparse.Namespace) -> int:
    with connect(args.socket) as c:
        job = c.job(args.job_id)
    if args.json:
        _emit_json(job)
        return 0
    from lattice.demo import ProgressLine
    print(f"job      {job['id']}\ntask     {job.get('task') or job.get('kind')}\n"
          f"status   {job.get('status')}\nprogress {ProgressLine().format(job)}\n"
          f"model    {job.get('model') or '-'}")
    if job.get("reason"):
        print(f"reason   {job['reason']}")
    participants = sorted((job.get("participants") or {}).items())
    if job.get("kind") == "merge":
        rows = [[pid, e.get("state", "-"), str(e.get("steps", "-")), str(e.get("helped", "-")),
                 _bytes_text(int(e.get("bytes_received") or 0)), (e.get("reason") or "")[:60]]
                for pid, e in participants]
        headers = ["PARTICIPANT", "STATE", "TENSORS", "TAKEN OVER", "FETCHED", "REASON"]
    else:
        rows = [[pid, e.get("state", "-"), str(e.get("steps", "-")),
                 "-" if e.get("loss") is None else f"{e['loss']:.3f}",
                 "-" if e.get("accuracy") is None else f"{100 * e['accuracy']:.1f}%"]
                for pid, e in participants]
        headers = ["PARTICIPANT", "STATE", "STEPS", "LOSS", "ACCURACY"]
    if rows:
        print(_table(rows, headers))
    return 0


def cmd_jobs_watch(args: argparse.Namespace) -> int:
    from lattice.demo import watch_job
    with connect(args.socket, timeout=None) as c:
        summary = watch_job(c, args.job_id)
    if summary.get("reason"):
        print(f"lattice: job {summary['status']}: {summary['reason']}", file=sys.stderr)
    return 0 if summary.get("status") == "done" else 1


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with connect(args.socket) as c:
        r = c.cancel_job(args.job_id)
    print("cancelled" if r["cancelled"] else "the job had already ended")
    return 0


def _duration_arg(text: str) -> float:
    """``90s``, ``15m``, ``2h``, ``1d``, ``1h30m`` -> seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 2h, 1d or 1h30m")
    seconds = sum(float(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the duration must be positive")
    return seconds


def cmd_pause(args: argparse.Namespace) -> int:
    with connect(args.socket) as c:
        gov = c.pause(for_s=args.for_s, reason=args.reason)
    if args.json:
        _emit_json(gov)
    else:
        print(gov["summary"])
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    with connect(args.socket) as c:
        gov = c.resume()
    if args.json:
        _emit_json(gov)
    elif gov["state"] == "running":
        print("running")
    else:
        print(f"resumed by you, but still {gov['summary']}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    with connect(args.socket) as c:
        models = c.models()
    if args.json:
        _emit_json(models)
        return 0
    if not models:
        print("no models")
        return 0
    rows = []
    for mid, m in sorted(models.items()):
        metrics = m.get("metrics") or {}
        acc = metrics.get("accuracy")
        made = f"job {m['job'][:12]}" if m.get("job") else (m.get("method") or "import")
        rows.append([mid, (m.get("name") or "-")[:24], made, "-" if acc is None else f"{100 * acc:.2f}%",
                     _bytes_text(int(m["bytes"])) if isinstance(m.get("bytes"), int) else "-"])
    print(_table(rows, ["MODEL ID", "NAME", "MADE BY", "ACCURACY", "SIZE"]))
    return 0


def cmd_models_get(args: argparse.Namespace) -> int:
    from lattice.demo import download_model
    from lattice.learn.modelfile import MANIFEST_MAGIC
    out = Path(args.output)
    if out.suffix not in (".npz", ".safetensors"):
        print("lattice: -o FILE must end in .npz or .safetensors", file=sys.stderr)
        return 2
    with connect(args.socket, timeout=None) as c:
        data = download_model(c, args.model_id)
        if data.startswith(MANIFEST_MAGIC):  # a v2 model: its blob is the manifest of its pieces
            if out.suffix != ".safetensors":
                print("lattice: this model is stored as pieces: `lattice models export ID -o "
                      "FILE.safetensors`, or -o FILE.safetensors here", file=sys.stderr)
                return 2
            r = c.export_model(args.model_id, str(out.resolve()))
            print(f"wrote {r['path']} ({r['bytes']} bytes), model {args.model_id}")
            return 0
    if out.suffix == ".safetensors":
        out.write_bytes(data)
    else:
        from lattice.learn.merge import loads_safetensors, save_npz
        arrays, meta = loads_safetensors(data)
        save_npz(out, arrays, meta)
    print(f"wrote {out} ({out.stat().st_size} bytes), model {args.model_id} verified")
    return 0


def _bytes_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_model(args: argparse.Namespace, r: dict[str, Any], verb: str) -> int:
    if args.json:
        _emit_json(r)
        return 0
    dtypes = ", ".join(f"{k} x{v}" for k, v in (r.get("dtypes") or {}).items())
    print(f"{verb} model {r['id']}" + (f" ({r['name']})" if r.get("name") else ""))
    print(f"  {r.get('tensors', '?')} tensors, {_bytes_text(int(r.get('bytes') or 0))}; {dtypes}")
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    with connect(args.socket, timeout=None) as c:
        r = c.import_model(str(Path(args.path).resolve()), args.name)
    return _print_model(args, r, "imported")


def cmd_models_export(args: argparse.Namespace) -> int:
    with connect(args.socket, timeout=None) as c:
        r = c.export_model(args.model_id, str(Path(args.output).resolve()), args.shard_bytes)
    if args.json:
        _emit_json(r)
    else:
        print(f"wrote {r['path']}: {', '.join(r['files'])} ({_bytes_text(r['bytes'])})")
    return 0


def _merge_arguments(p: argparse.ArgumentParser) -> None:
    """The merge options `models merge` and `jobs submit merge` share."""
    p.add_argument("--method", help="linear | slerp | task_arithmetic | ties | dare_linear | "
                   "dare_ties | breadcrumbs | della | model_stock | nuslerp")
    p.add_argument("--models", nargs="+", metavar="ID", help="input model ids or names, in order")
    p.add_argument("--base", metavar="ID", help="the base model")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per model")
    p.add_argument("--density", type=float)
    p.add_argument("--lambda", dest="lambda_", metavar="LAMBDA", type=float,
                   help="scale of the merged task vector")
    p.add_argument("--t", type=float, help="slerp's interpolation factor")
    p.add_argument("--gamma", type=float, help="breadcrumbs: share of the largest entries dropped")
    p.add_argument("--epsilon", type=float, help="della: spread of keep probabilities")
    p.add_argument("--seed", type=int, help="DARE/DELLA mask seed (default 0)")
    p.add_argument("--dtype", help="output dtype: float32 | float16 | bfloat16 | float64")
    p.add_argument("--config", help="a mergekit YAML config (model references: ids or names)")
    p.add_argument("--name", help="a name for the registry")


def _merge_request(args: argparse.Namespace) -> tuple[dict[str, Any] | None, str | None]:
    """(spec, config text) from the merge options; SystemExit(2) when they conflict."""
    if args.config:
        if args.models or args.method:
            print("lattice: --config replaces --method and --models", file=sys.stderr)
            raise SystemExit(2)
        return None, Path(args.config).read_text()
    if not args.method or not args.models:
        print("lattice: give --method and --models (or --config FILE)", file=sys.stderr)
        raise SystemExit(2)
    params = {k: v for k, v in (("density", args.density), ("lambda", args.lambda_), ("t", args.t),
                                ("gamma", args.gamma), ("epsilon", args.epsilon), ("seed", args.seed))
              if v is not None}
    spec = {"method": args.method, "models": args.models, "base": args.base, "weights": args.weights,
            "dtype": args.dtype, "parameters": params}
    return {k: v for k, v in spec.items() if v is not None}, None


def cmd_models_merge(args: argparse.Namespace) -> int:
    spec, config = _merge_request(args)
    with connect(args.socket, timeout=None) as c:
        r = c.merge_models(spec, config, args.name)
    return _print_model(args, r, f"merged ({r.get('method')})")


def cmd_jobs_submit_merge(args: argparse.Namespace) -> int:
    spec, config = _merge_request(args)
    request: dict[str, Any] = {"kind": "merge", **(spec or {"config": config})}
    for name in ("name", "min_peers", "max_peers", "join_window", "merge_timeout"):
        if getattr(args, name) is not None:
            request[name] = getattr(args, name)
    with connect(args.socket, timeout=None) as c:
        r = c.submit_job(request, allow=args.allow or None, private=args.private or None)
    _print_submitted(args, r, request=request)
    return 0


def cmd_models_verify(args: argparse.Namespace) -> int:
    with connect(args.socket, timeout=None) as c:
        r = c.verify_model(args.model_id, args.tensors)
    if args.json:
        _emit_json(r)
    elif r["matches"]:
        print(f"every byte of {r['checked']} tensors matches: {r['model_id']} is {r['method']} of its inputs")
    else:
        print(f"MISMATCH in {len(r['mismatches'])} of {r['checked']} tensors of {r['model_id']}:")
        for name, reason in sorted(r["mismatches"].items()):
            print(f"  {name}: {reason}")
    return 0 if r["matches"] else 1


def cmd_models_info(args: argparse.Namespace) -> int:
    with connect(args.socket, timeout=None) as c:
        r = c.model_info(args.model_id)
    if args.json:
        _emit_json(r)
        return 0
    print(f"model {r['model_id']} ({r['format']})")
    for k, v in sorted(r["metadata"].items()):
        print(f"  {k}: {v if len(v) < 200 else v[:200] + '…'}")
    rows = [[n, t["dtype"], "x".join(map(str, t["shape"])) or "scalar"] for n, t in r["tensors"].items()]
    print(_table(rows, ["TENSOR", "DTYPE", "SHAPE"]))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    with connect(args.socket) as c:
        with c.subscribe(args.topic or ["peers", "daemon"]) as events:
            for ev in events:
                print(json.dumps(ev, sort_keys=True, default=str), flush=True)
    return 0


def cmd_localnet(args: argparse.Namespace) -> int:
    from lattice.client.localnet import LocalNet, LocalNetError

    if args.train:
        from lattice.demo import run_main_job
        return run_main_job(nodes=args.nodes, task=args.train, steps=args.steps,
                            base_dir=Path(args.base_dir) if args.base_dir else None)

    base = Path(args.base_dir) if args.base_dir else Path(tempfile.mkdtemp(prefix="lattice-localnet-"))
    net = LocalNet(args.nodes, base, log_level=args.log_level)
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    print(f"starting {args.nodes} daemons under {base}", file=sys.stderr, flush=True)
    try:
        try:
            net.start(on_ready=lambda n: print(f"node {n.index} {n.peer_id} {n.socket}", flush=True))
        except LocalNetError as e:
            print(f"lattice: localnet: {e}", file=sys.stderr)
            return 1
        if args.demo:
            return _demo_mesh(net)
        print("all nodes running; Ctrl-C stops them", file=sys.stderr, flush=True)
        # A node that dies (crash, or killed to watch churn) is reported and the rest
        # keep running; when none is left there is nothing to supervise.
        exited: set[int] = set()
        while len(exited) < len(net.nodes):
            for node in net.nodes:
                if node.index not in exited and node.process.poll() is not None:
                    exited.add(node.index)
                    print(f"lattice: localnet: node {node.index} exited with code "
                          f"{node.process.returncode}; log: {node.log_path}; "
                          f"{len(net.nodes) - len(exited)} still running",
                          file=sys.stderr, flush=True)
            time.sleep(0.5)  # supervising child processes: nothing to wait on in one call
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        codes = net.stop()
        bad = {i: c for i, c in codes.items() if c != 0}
        print(f"stopped {len(codes)} daemons" + (f"; non-zero exits: {bad}" if bad else " cleanly"),
              file=sys.stderr)
    return 1 if bad else 0


def _demo_mesh(net: Any) -> int:
    """`localnet --demo`: show the nodes finding each other, then stop them (a smoke
    check of a machine's setup without training)."""
    want = len(net.nodes) - 1
    deadline = time.monotonic() + 30
    seen: dict[int, int] = {}
    while time.monotonic() < deadline:
        counts = {}
        for node in net.nodes:
            with node.client() as c:
                counts[node.index] = len(c.peers())
        if counts != seen:
            print("peers per node: " + "  ".join(f"node {i}: {k}" for i, k in counts.items()), flush=True)
            seen = counts
        if counts[0] == want and all(v >= 1 for v in counts.values()):
            print(f"network up: node 0 sees all {want} others, every node has a peer", flush=True)
            return 0
        time.sleep(0.2)
    print("lattice: localnet: the nodes did not find each other within 30 s", file=sys.stderr)
    return 1


# -- parser -------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", default=argparse.SUPPRESS,
                        help="daemon socket (default: $LATTICE_SOCKET, else <state dir>/latticed.sock)")
    js = argparse.ArgumentParser(add_help=False)
    js.add_argument("--json", action="store_true", help="print one JSON document")

    p = argparse.ArgumentParser(prog="lattice", parents=[common],
                                description="Talk to a local Lattice daemon (latticed).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("status", parents=[common, js], help="daemon identity, state and addresses")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("peers", parents=[common, js], help="connected peers")
    s.set_defaults(func=cmd_peers)
    psub = s.add_subparsers(dest="peers_command", metavar="SUBCOMMAND")
    c = psub.add_parser("connect", parents=[common, js], help="dial a peer by multiaddr")
    c.add_argument("multiaddr", help="/ip4/…/tcp/…/p2p/<peer id>")
    c.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    c.set_defaults(func=cmd_peers_connect)
    f = psub.add_parser("find", parents=[common, js], help="resolve a peer id through the DHT")
    f.add_argument("peer_id")
    f.set_defaults(func=cmd_peers_find)

    s = sub.add_parser("dht", parents=[common], help="store and fetch small signed values")
    dsub = s.add_subparsers(dest="dht_command", metavar="SUBCOMMAND", required=True)
    d = dsub.add_parser("put", parents=[common, js], help="sign and store VALUE under KEY")
    d.add_argument("key")
    d.add_argument("value")
    d.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    d.add_argument("--value-json", action="store_true", help="VALUE is JSON (else text)")
    d.set_defaults(func=cmd_dht_put)
    d = dsub.add_parser("get", parents=[common, js], help="every live value under KEY")
    d.add_argument("key")
    d.add_argument("--fresh", action="store_true",
                   help="ask the network even when this daemon holds a replica")
    d.set_defaults(func=cmd_dht_get)

    s = sub.add_parser("members", parents=[common, js], help="network members and their liveness")
    s.set_defaults(func=cmd_members)

    s = sub.add_parser("state", parents=[common], help="the replicated shared state")
    ssub = s.add_subparsers(dest="state_command", metavar="SUBCOMMAND", required=True)
    g = ssub.add_parser("get", parents=[common, js], help="print the value at PATH")
    g.add_argument("path", nargs="?", default="",
                   help="'' (all), members[/<peer>], jobs[/<id>], models/<id>, counters/<name>")
    g.set_defaults(func=cmd_state_get)
    w = ssub.add_parser("watch", parents=[common], help="stream changes under PATH as JSON lines")
    w.add_argument("path", nargs="?", default="")
    w.set_defaults(func=cmd_state_watch)

    s = sub.add_parser("jobs", parents=[common], help="submit, list, watch and cancel jobs")
    jsub = s.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND", required=True)
    submit = jsub.add_parser("submit", parents=[common], help="submit a job; prints its id")
    ksub = submit.add_subparsers(dest="kind", metavar="KIND", required=True)
    j = ksub.add_parser("train", parents=[common, js], help="decentralized SGD on a task, among the "
                        "daemons that accept it")
    j.add_argument("--task", required=True, help="digits-mlp | digits-softmax | breast-cancer-logreg | "
                   "fashion-mlp | fashion-softmax | plugin")
    j.add_argument("--min-peers", type=int, default=4, help="participants (default 4)")
    j.add_argument("--steps", type=int, help="local steps per participant")
    j.add_argument("--sync-every", type=int, help="average with a random peer every H steps "
                   "(with --schedule: the budget, steps/H averages)")
    j.add_argument("--schedule", help="constant | late[:POWER] | tail[:FRACTION]: where the averages fall")
    j.add_argument("--algorithm", choices=["gossip", "noloco", "none"])
    j.add_argument("--partition", help="iid | dirichlet:ALPHA")
    j.add_argument("--compression", help="none | fp16 | int8 | topk:R")
    j.add_argument("--weighting", help="data | uniform | samples: weights of averages and the merge")
    j.add_argument("--correction", help="none | logit-adjust: drift correction for label skew")
    j.add_argument("--seed", type=int)
    j.add_argument("--batch", type=int)
    j.add_argument("--lr", type=float)
    _access_arguments(j)
    j.set_defaults(func=cmd_jobs_submit)
    j = ksub.add_parser("merge", parents=[common, js], help="merge models by id across the daemons "
                        "that accept merge jobs (proto/jobs.md); the result records how it was made",
                        description="Merge models across the daemons whose config accepts merge jobs: "
                        "the tensors are divided among them, each fetches only the input pieces it "
                        "merges, and the result is a model id that `lattice models verify` recomputes.")
    _merge_arguments(j)
    j.add_argument("--min-peers", type=int, help="participants needed (default 1: one merges alone)")
    j.add_argument("--max-peers", type=int, help="participants taken at most (default 8)")
    j.add_argument("--join-window", type=float, metavar="SECONDS",
                   help="how long volunteers are gathered before the merge starts (default 5)")
    j.add_argument("--merge-timeout", type=float, metavar="SECONDS",
                   help="how long the merger waits for the others' shares (default 120)")
    _access_arguments(j)
    j.set_defaults(func=cmd_jobs_submit_merge)
    j = jsub.add_parser("join", parents=[common], help="take part in a job (a private one: "
                        "with its token)")
    j.add_argument("job_id")
    j.add_argument("--token", help="the token the job's submitter handed out")
    j.set_defaults(func=cmd_jobs_join)
    j = jsub.add_parser("list", parents=[common, js], help="every job, newest first")
    j.set_defaults(func=cmd_jobs_list)
    j = jsub.add_parser("get", parents=[common, js], help="one job in detail")
    j.add_argument("job_id")
    j.set_defaults(func=cmd_jobs_get)
    j = jsub.add_parser("watch", parents=[common], help="live progress until the job ends")
    j.add_argument("job_id")
    j.set_defaults(func=cmd_jobs_watch)
    j = jsub.add_parser("cancel", parents=[common], help="cancel a job you submitted")
    j.add_argument("job_id")
    j.set_defaults(func=cmd_jobs_cancel)

    s = sub.add_parser("models", parents=[common], help="the model registry")
    msub = s.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    m = msub.add_parser("list", parents=[common, js], help="published models and metrics")
    m.set_defaults(func=cmd_models_list)
    m = msub.add_parser("get", parents=[common], help="fetch a model by id into a file")
    m.add_argument("model_id")
    m.add_argument("-o", "--output", required=True, help="FILE.npz or FILE.safetensors")
    m.set_defaults(func=cmd_models_get)
    m = msub.add_parser("import", parents=[common, js], help="import a .safetensors file, a Hugging "
                        "Face directory (sharded) or an .npz; the daemon reads PATH")
    m.add_argument("path")
    m.add_argument("--name", help="a name for the registry (default: the file name)")
    m.set_defaults(func=cmd_models_import)
    m = msub.add_parser("export", parents=[common, js], help="write a model to FILE.safetensors or a "
                        "Hugging Face directory (sharded when large); the daemon writes it")
    m.add_argument("model_id", help="model id or name")
    m.add_argument("-o", "--output", required=True, help="FILE.safetensors or DIR")
    m.add_argument("--shard-bytes", type=int, help="bytes per shard in DIR (default: the daemon's)")
    m.set_defaults(func=cmd_models_export)
    m = msub.add_parser("merge", parents=[common, js], help="merge models on this daemon "
                        "(proto/merge.md); the result records how it was made")
    _merge_arguments(m)
    m.set_defaults(func=cmd_models_merge)
    m = msub.add_parser("verify", parents=[common, js], help="recompute a merged model from its "
                        "inputs and say whether every byte matches (exit 1 if not)")
    m.add_argument("model_id", help="model id or name")
    m.add_argument("--tensors", nargs="+", metavar="PATTERN", help="only tensors matching these globs")
    m.set_defaults(func=cmd_models_verify)
    m = msub.add_parser("info", parents=[common, js], help="a model's metadata and tensors")
    m.add_argument("model_id", help="model id or name")
    m.set_defaults(func=cmd_models_info)

    s = sub.add_parser("pause", parents=[common, js],
                       help="pause job compute (stays in the network); survives a restart")
    s.add_argument("--for", dest="for_s", type=_duration_arg, metavar="DURATION",
                   help="30m, 2h, 1d, 1h30m (default: until `lattice resume`)")
    s.add_argument("--reason", default="", help="shown in `lattice status`")
    s.set_defaults(func=cmd_pause)
    s = sub.add_parser("resume", parents=[common, js], help="lift a pause set by `lattice pause`")
    s.set_defaults(func=cmd_resume)

    s = sub.add_parser("events", parents=[common], help="stream daemon events as JSON lines")
    s.add_argument("--topic", action="append", help="peers | daemon (repeatable; default both)")
    s.set_defaults(func=cmd_events)

    s = sub.add_parser("localnet", help="run N daemons on 127.0.0.1 in the foreground")
    s.add_argument("--nodes", type=int, default=4, help="how many daemons (default 4)")
    s.add_argument("--base-dir", help="where their state dirs go (default: a new temp dir)")
    s.add_argument("--log-level", default="info", help="daemon log level")
    s.add_argument("--demo", action="store_true",
                   help="exit once the nodes have found each other")
    s.add_argument("--train", metavar="TASK",
                   help="the main job: train TASK across the nodes, compare the merged model "
                        "with centralized SGD, then stop (e.g. --train digits-mlp)")
    s.add_argument("--steps", type=int, default=300, help="with --train: steps per node")
    s.set_defaults(func=cmd_localnet)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "socket"):
        args.socket = None
    try:
        return args.func(args)
    except DaemonNotRunningError as e:
        print(f"lattice: {e}", file=sys.stderr)
        return 1
    except LatticeError as e:
        print(f"lattice: error: {e}", file=sys.stderr)
        return 1
    except TimeoutError as e:
        print(f"lattice: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lattice peers | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
