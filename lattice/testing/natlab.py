"""A NAT testbed out of Linux network namespaces, veth pairs and iptables.

Owns: building a topology from a declarative `Spec` (a public "internet" segment and
private LANs behind NAT routers), running commands and creating sockets inside its
namespaces, and removing every trace of it again (`Testbed.build` is a context manager;
`down_all` cleans up after crashed runs). Also the `natlab` command (`main`).
Must not import libp2p, trio or anything from `lattice.net`: it is plumbing that tests,
benchmarks and developers put daemons into, not part of a daemon. Needs root.

Topology (theory of operation)
------------------------------
::

    ns <p>-inet: bridge br0 ("the internet", 198.18.0.0/24; 198.18.0.1 drops the rest)
       |-- veth --> ns <p>-bootstrap  eth0 198.18.0.10    (public host)
       |-- veth --> ns <p>-relay      eth0 198.18.0.11    (public host)
       |-- veth --> ns <p>-gw-<lan>   wan0 198.18.0.101   (NAT router, one per LAN)
                        lan0 198.19.1.1 -- LAN bridge --> ns <p>-a  eth0 198.19.1.10

Routers SNAT LAN traffic leaving wan0: endpoint-independent mapping (`MASQUERADE`, which
keeps the source port when it is free) for `Nat.CONE`, or a fresh random port for every
new connection (`MASQUERADE --random-fully`) for `Nat.SYMMETRIC`. Both filter like a home
router: from the WAN only packets conntrack knows (ESTABLISHED,RELATED) get in, NEW
traffic is dropped silently, in FORWARD *and* INPUT. INPUT matters: an unsolicited SYN
to the router's own WAN address that matches no NAT mapping is local traffic; without
the drop the router's kernel answers with a RST, which kills the peer's half of a TCP
simultaneous open (real routers that do this break hole punching; ours do not).
Inside a LAN, hosts reach each other directly through the router's LAN bridge, as
through a home router's switch, multicast (mDNS) included. The router's FORWARD chain
accepts lan0 -> lan0 explicitly: where the host kernel has br_netfilter loaded (docker,
for one, loads it; net.bridge.bridge-nf-call-iptables is then 1 in every namespace),
frames switched between two LAN ports traverse the router's iptables FORWARD chain, whose
policy is DROP; without the rule two hosts on one LAN could not exchange a single packet.
A `firewalled` public host has a public address but drops NEW inbound traffic itself.
The internet itself (198.18.0.1 on br0, the default route of every public host and
router) silently drops packets for destinations it does not hold, as the real internet
does with private addresses: a dial to a peer's LAN address from elsewhere hangs until
its timeout instead of failing fast (libraries that dial every advertised address must
survive that). ``Spec(unknown_dst="unreachable")`` answers with ICMP instead.

Every namespace is named ``<prefix>-<role>`` where prefix is ``nl`` + 6 hex digits,
unique per run, so parallel runs never clash. Links are created directly inside the
namespaces (never in the host's namespace), so their short names (eth0, wan0, lan0,
v-<name>) cannot clash either, and die with their namespace. A state file per run in
``/run/natlab/`` (``NATLAB_STATE_DIR``) records the owner pid; `down_all` removes runs
whose owner is gone and namespaces with the prefix pattern but no state file.

No traffic delay is emulated: this kernel has no sch_netem; RTTs are sub-millisecond.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import enum
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

PUBLIC_NET = ipaddress.ip_network("198.18.0.0/24")
LAN_NET_TEMPLATE = "198.19.{n}.0/24"
_INET_ADDR = 1  # 198.18.0.1: the internet's router, where unknown destinations die
_PUBLIC_HOST_BASE = 10  # public hosts: 198.18.0.10, .11, ...
_ROUTER_WAN_BASE = 100  # router of LAN n: 198.18.0.(100 + n)
_LAN_HOST_BASE = 10  # hosts of LAN n: 198.19.n.10, .11, ...

_PREFIX_RE = re.compile(r"^nl[0-9a-f]{6}$")
_NETNS_RE = re.compile(r"^(nl[0-9a-f]{6})-")
_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_CLONE_NEWNET = 0x40000000
_CMD_TIMEOUT = 20.0


class TestbedError(RuntimeError):
    """A testbed could not be built or removed (a command failed)."""

    __test__ = False  # not a pytest class despite the name


class Nat(enum.Enum):
    CONE = "cone"  # endpoint-independent mapping, port-preserving (MASQUERADE)
    SYMMETRIC = "symmetric"  # new random port per connection (--random-fully)


@dataclasses.dataclass(frozen=True)
class PublicHost:
    name: str
    firewalled: bool = False  # public address, but drops unsolicited inbound itself


@dataclasses.dataclass(frozen=True)
class Lan:
    name: str
    nat: Nat
    hosts: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Spec:
    """What to build: hosts on the public segment and LANs behind NAT routers."""

    name: str
    public: tuple[PublicHost, ...] = ()
    lans: tuple[Lan, ...] = ()
    # What happens to packets for addresses outside the testbed (e.g. a peer's LAN
    # address dialed from another LAN): "blackhole" drops them silently like the real
    # internet; "unreachable" answers with ICMP so such dials fail at once.
    unknown_dst: str = "blackhole"

    def __post_init__(self) -> None:
        names = [h.name for h in self.public] + [h for lan in self.lans for h in lan.hosts]
        roles = names + ["gw-" + lan.name for lan in self.lans]
        for name in names + [lan.name for lan in self.lans]:
            if not _NAME_RE.match(name):
                raise ValueError(f"bad name {name!r}: want [a-z][a-z0-9]{{0,11}}")
        if len(set(roles)) != len(roles) or "inet" in roles:
            raise ValueError(f"names must be unique and not 'inet': {roles}")
        if self.unknown_dst not in ("blackhole", "unreachable"):
            raise ValueError(f"unknown_dst must be blackhole or unreachable: {self.unknown_dst!r}")
        if len(self.lans) > 150 or len(self.public) > 80:
            raise ValueError("too many LANs or public hosts for the address plan")


def _two_peer_case(name: str, a: Nat | None, b: Nat | None) -> Spec:
    public = [PublicHost("bootstrap"), PublicHost("relay")]
    lans = []
    for peer, nat in (("a", a), ("b", b)):
        if nat is None:
            public.append(PublicHost(peer))
        else:
            lans.append(Lan(f"lan{peer}", nat, (peer,)))
    return Spec(name, tuple(public), tuple(lans))


CASES: dict[str, Spec] = {
    s.name: s
    for s in (
        _two_peer_case("public_x_public", None, None),
        _two_peer_case("public_x_cone", None, Nat.CONE),
        _two_peer_case("nat_cone_x_cone", Nat.CONE, Nat.CONE),
        _two_peer_case("nat_cone_x_symmetric", Nat.CONE, Nat.SYMMETRIC),
        _two_peer_case("nat_symmetric_x_symmetric", Nat.SYMMETRIC, Nat.SYMMETRIC),
        Spec(
            "firewalled_x_cone",
            (PublicHost("bootstrap"), PublicHost("relay"), PublicHost("a", firewalled=True)),
            (Lan("lanb", Nat.CONE, ("b",)),),
        ),
        # one home LAN and nothing public: what daemons find there without any bootstrap
        Spec("same_lan", (), (Lan("lan", Nat.CONE, ("a", "b", "c", "d")),)),
    )
}


def case(name: str) -> Spec:
    try:
        return CASES[name]
    except KeyError:
        raise KeyError(f"unknown case {name!r}; known: {', '.join(CASES)}") from None


# --- running things -------------------------------------------------------------------


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, timeout=_CMD_TIMEOUT
    )
    if check and proc.returncode != 0:
        raise TestbedError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def unavailable_reason() -> str | None:
    """Why a testbed cannot be built here, or None if it can (for pytest skips)."""
    if sys.platform != "linux":
        return "natlab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "natlab needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables", "iptables-restore"):
        if shutil.which(tool) is None:
            return (f"natlab needs `{tool}`: apt-get install -y iproute2 iptables conntrack")
    try:
        _run(["ip", "netns", "list"])
    except (TestbedError, OSError) as e:
        return f"`ip netns` is unavailable: {e}"
    return None


_libc: Any = None


def _setns(path: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _call_in_netns(netns: str, fn: Any) -> Any:
    """Call ``fn()`` in a short-lived thread that has entered ``netns``.

    setns(CLONE_NEWNET) only moves the calling thread, and a socket stays in the
    namespace it was created in, so sockets made this way can be used from any thread
    (trio: `trio.socket.from_stdlib_socket`). Much faster than a subprocess per peer.
    """
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            _setns(f"/run/netns/{netns}")
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
            out["error"] = e

    t = threading.Thread(target=target, name=f"natlab-setns-{netns}")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


# --- nodes ----------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Node:
    """A namespace holding one host (or router) of the testbed."""

    name: str
    netns: str
    addr: str  # the address others use: public hosts and routers: on 198.18.0.0/24
    role: str  # "public" | "firewalled" | "private" | "router"
    lan: str | None = None
    gateway: Router | None = None  # the NAT router in front of a private host
    _testbed: Testbed | None = dataclasses.field(default=None, repr=False)

    def cmd(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so it runs inside this node's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.cmd(argv), check=check, timeout=timeout, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process in this namespace; teardown kills it if it still runs."""
        proc = subprocess.Popen(self.cmd(argv), start_new_session=True, **kw)
        if self._testbed is not None:
            self._testbed._procs.append(proc)
        return proc

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
               proto: int = 0) -> socket.socket:
        """A stdlib socket living in this namespace (usable from any thread)."""
        return _call_in_netns(self.netns, lambda: socket.socket(family, type, proto))

    def call(self, fn: Any) -> Any:
        """Run ``fn()`` in a thread inside this namespace (e.g. to open a listener)."""
        return _call_in_netns(self.netns, fn)


@dataclasses.dataclass(eq=False)
class Router(Node):
    nat: Nat = Nat.CONE
    lan_addr: str = ""
    lan_net: str = ""

    @property
    def wan_addr(self) -> str:
        return self.addr

    def unsolicited_drops(self) -> int:
        """Packets from the WAN dropped because no connection of ours expected them."""
        return _drop_counter(self)

    def conntrack(self) -> str:
        """The router's connection-tracking table (needs the `conntrack` tool)."""
        return self.run(["conntrack", "-L"], check=False).stdout


def _drop_counter(node: Node) -> int:
    out = node.run(["iptables", "-w", "-L", "UNSOLICITED", "-v", "-x", "-n"]).stdout
    for line in out.splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "DROP":
            return int(fields[0])
    raise TestbedError(f"no DROP rule in {node.netns} UNSOLICITED chain:\n{out}")


def _router_rules(nat: Nat) -> str:
    masq = "-j MASQUERADE --random-fully" if nat is Nat.SYMMETRIC else "-j MASQUERADE"
    return f"""*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -o wan0 {masq}
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:UNSOLICITED - [0:0]
-A UNSOLICITED -j DROP
-A INPUT -i wan0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -i wan0 -j UNSOLICITED
-A FORWARD -i lan0 -o lan0 -j ACCEPT
-A FORWARD -i lan0 -o wan0 -j ACCEPT
-A FORWARD -i wan0 -o lan0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i wan0 -j UNSOLICITED
COMMIT
"""


_FIREWALL_RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:UNSOLICITED - [0:0]
-A UNSOLICITED -j DROP
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -j UNSOLICITED
COMMIT
"""


# --- state files ----------------------------------------------------------------------


def _state_dir() -> Path:
    return Path(os.environ.get("NATLAB_STATE_DIR", "/run/natlab"))


def _state_path(prefix: str) -> Path:
    return _state_dir() / f"{prefix}.json"


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _all_netns() -> list[str]:
    out = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


# --- the testbed ----------------------------------------------------------------------


class Testbed:
    """A built topology. Use `Testbed.build(spec)` as a context manager."""

    __test__ = False

    def __init__(self, spec: Spec, prefix: str) -> None:
        self.spec = spec
        self.prefix = prefix
        self._nodes: dict[str, Node] = {}
        self._routers: dict[str, Router] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []  # namespaces, in creation order
        self.inet = f"{prefix}-inet"

    # -- construction

    @classmethod
    @contextlib.contextmanager
    def build(cls, spec: Spec | str, *, prefix: str | None = None) -> Iterator[Testbed]:
        """Build ``spec``, yield the testbed, remove everything on exit (even on error)."""
        tb = cls.create(spec, prefix=prefix, owner_pid=os.getpid())
        try:
            yield tb
        finally:
            tb.teardown()

    @classmethod
    def create(cls, spec: Spec | str, *, prefix: str | None = None,
               owner_pid: int | None = None) -> Testbed:
        """Build and return; the caller must call `teardown()` (or `natlab down`).

        ``owner_pid`` None marks a hand-made testbed that only `natlab down` removes.
        """
        if isinstance(spec, str):
            spec = case(spec)
        reason = unavailable_reason()
        if reason is not None:
            raise TestbedError(reason)
        existing = _all_netns()
        if prefix is None:
            while True:
                prefix = "nl" + secrets.token_hex(3)
                if not any(ns.startswith(prefix + "-") for ns in existing):
                    break
        elif not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix must look like nl0123ab, got {prefix!r}")
        elif any(ns.startswith(prefix + "-") for ns in existing):
            raise TestbedError(f"a testbed with prefix {prefix} already exists")
        tb = cls(spec, prefix)
        tb._write_state(owner_pid)
        try:
            tb._build()
        except BaseException:
            tb.teardown()
            raise
        return tb

    def _write_state(self, owner_pid: int | None) -> None:
        _state_dir().mkdir(parents=True, exist_ok=True)
        _state_path(self.prefix).write_text(json.dumps({
            "prefix": self.prefix, "case": self.spec.name, "owner_pid": owner_pid,
            "created": time.time(),
        }))

    def _add_netns(self, role: str) -> str:
        ns = f"{self.prefix}-{role}"
        _run(["ip", "netns", "add", ns])
        self._created.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def _sysctl(self, ns: str, key: str, value: str) -> None:
        _run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"])

    def _plug(self, bridge_ns: str, bridge: str, port: str, ns: str, ifname: str,
              cidr: str) -> None:
        """veth from ``bridge`` (in bridge_ns) to ``ifname`` in ``ns`` with ``cidr``."""
        _run(["ip", "-n", bridge_ns, "link", "add", port, "type", "veth",
              "peer", "name", ifname, "netns", ns])
        _run(["ip", "-n", bridge_ns, "link", "set", port, "master", bridge, "up"])
        _run(["ip", "-n", ns, "addr", "add", cidr, "dev", ifname])
        _run(["ip", "-n", ns, "link", "set", ifname, "up"])

    def _restore(self, ns: str, rules: str) -> None:
        _run(["ip", "netns", "exec", ns, "iptables-restore", "-w"], input=rules)

    def _build(self) -> None:
        plen = PUBLIC_NET.prefixlen
        pub = list(PUBLIC_NET.hosts())
        self._add_netns("inet")
        _run(["ip", "-n", self.inet, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.inet, "link", "set", "br0", "up"])
        inet_ip = str(pub[_INET_ADDR - 1])
        _run(["ip", "-n", self.inet, "addr", "add", f"{inet_ip}/{plen}", "dev", "br0"])
        _run(["ip", "-n", self.inet, "route", "add", self.spec.unknown_dst, "default"])
        self._sysctl(self.inet, "net.ipv4.ip_forward", "1")
        # A blackhole route on the sending host itself fails connect() at once (EINVAL);
        # only a router's blackhole makes a SYN vanish. So hosts route via the internet.

        for i, host in enumerate(self.spec.public):
            addr = str(pub[_PUBLIC_HOST_BASE + i - 1])
            ns = self._add_netns(host.name)
            self._plug(self.inet, "br0", f"v-{host.name}", ns, "eth0", f"{addr}/{plen}")
            _run(["ip", "-n", ns, "route", "add", "default", "via", inet_ip])
            role = "firewalled" if host.firewalled else "public"
            if host.firewalled:
                self._restore(ns, _FIREWALL_RULES)
            self._nodes[host.name] = Node(host.name, ns, addr, role, _testbed=self)

        for n, lan in enumerate(self.spec.lans, start=1):
            lan_net = ipaddress.ip_network(LAN_NET_TEMPLATE.format(n=n))
            lan_hosts = list(lan_net.hosts())
            wan = str(pub[_ROUTER_WAN_BASE + n - 1])
            gw_ip = str(lan_hosts[0])
            gw = self._add_netns("gw-" + lan.name)
            self._plug(self.inet, "br0", f"v-gw-{lan.name}", gw, "wan0", f"{wan}/{plen}")
            # The LAN side is a bridge in the router too, so a LAN can hold many hosts.
            _run(["ip", "-n", gw, "link", "add", "lan0", "type", "bridge"])
            _run(["ip", "-n", gw, "link", "set", "lan0", "up"])
            router = Router(
                "gw-" + lan.name, gw, wan, "router", lan=lan.name, nat=lan.nat,
                lan_addr=gw_ip, lan_net=str(lan_net), _testbed=self,
            )
            for j, name in enumerate(lan.hosts):
                addr = str(lan_hosts[_LAN_HOST_BASE + j - 1])
                ns = self._add_netns(name)
                self._plug(gw, "lan0", f"v-{name}", ns, "eth0", f"{addr}/{lan_net.prefixlen}")
                _run(["ip", "-n", ns, "route", "add", "default", "via", gw_ip])
                self._nodes[name] = Node(name, ns, addr, "private", lan=lan.name,
                                         gateway=router, _testbed=self)
            _run(["ip", "-n", gw, "addr", "add", f"{gw_ip}/{lan_net.prefixlen}", "dev", "lan0"])
            _run(["ip", "-n", gw, "route", "add", "default", "via", inet_ip])
            self._sysctl(gw, "net.ipv4.ip_forward", "1")
            self._restore(gw, _router_rules(lan.nat))
            self._routers[lan.name] = router

    # -- access

    def host(self, name: str) -> Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise KeyError(f"no host {name!r} in {self.spec.name}: {list(self._nodes)}") from None

    def router(self, lan: str) -> Router:
        return self._routers[lan]

    def hosts(self) -> list[Node]:
        return list(self._nodes.values())

    def routers(self) -> list[Router]:
        return list(self._routers.values())

    def namespaces(self) -> list[str]:
        return list(self._created)

    def describe(self) -> str:
        """Human-readable: namespaces, addresses, and how to poke at them."""
        lines = [f"natlab {self.spec.name}  prefix={self.prefix}",
                 f"  {self.inet:<28} internet bridge br0, {PUBLIC_NET}, unknown "
                 f"destinations: {self.spec.unknown_dst}"]
        for node in self.hosts():
            where = f"{node.addr}"
            if node.gateway is not None:
                gw = node.gateway
                where += f"  behind {gw.netns} ({gw.nat.value} NAT, WAN {gw.wan_addr})"
            elif node.role == "firewalled":
                where += "  (public, drops unsolicited inbound)"
            lines.append(f"  {node.netns:<28} {node.role:<10} {where}")
        for r in self.routers():
            lines.append(f"  {r.netns:<28} router     WAN {r.wan_addr}  LAN {r.lan_addr} "
                         f"({r.lan_net}, {r.nat.value})")
        first_priv = next((n for n in self.hosts() if n.gateway is not None), None)
        first_pub = next((n for n in self.hosts() if n.role == "public"), None)
        lines.append("try:")
        if first_pub is not None:
            lines.append(f"  ip netns exec {first_pub.netns} python3 -m http.server "
                         f"--bind {first_pub.addr} 8000 &")
            if first_priv is not None:
                lines.append(f"  ip netns exec {first_priv.netns} curl -s "
                             f"http://{first_pub.addr}:8000/ >/dev/null && echo out-ok")
                priv_gw = first_priv.gateway
                assert priv_gw is not None
                lines.append(f"  ip netns exec {priv_gw.netns} conntrack -L     # see the NAT mapping")
                lines.append(f"  ip netns exec {gw.netns} iptables -L UNSOLICITED -v -n")
        lines.append(f"  ip netns exec {self.hosts()[0].netns} bash   # a shell in a host")
        lines.append(f"remove: tools/natlab down {self.prefix}")
        return "\n".join(lines)

    # -- teardown

    def teardown(self) -> None:
        """Kill what runs inside, delete every namespace; idempotent; raises at the end."""
        errors: list[str] = []
        for proc in self._procs:
            _stop_process_group(proc)
        self._procs.clear()
        for ns in reversed(self._created):
            err = _delete_netns(ns)
            if err:
                errors.append(err)
        self._created.clear()
        if not errors:
            _state_path(self.prefix).unlink(missing_ok=True)
        else:
            raise TestbedError("teardown incomplete: " + "; ".join(errors))


def _stop_process_group(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    # popen() started it in its own session: signal the group (ip netns exec's child).
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _delete_netns(ns: str) -> str | None:
    """Kill stragglers inside ``ns`` (they were started there by us), then delete it."""
    if ns not in _all_netns():
        return None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 2.0
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _pid_alive(p) and not _is_zombie(p)]
            time.sleep(0.02)
        if not pids:
            break
    proc = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True,
                          timeout=_CMD_TIMEOUT)
    if proc.returncode != 0 and ns in _all_netns():
        return f"ip netns del {ns}: {proc.stderr.strip()}"
    return None


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


# --- leftovers ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunInfo:
    prefix: str
    case: str | None
    owner_pid: int | None  # None: brought up by hand (`natlab up`)
    namespaces: tuple[str, ...]

    @property
    def state(self) -> str:
        if self.case is None:
            return "orphan"  # namespaces without a state file
        if self.owner_pid is None:
            return "manual"
        return "running" if _pid_alive(self.owner_pid) else "crashed"


def list_runs() -> list[RunInfo]:
    by_prefix: dict[str, list[str]] = {}
    for ns in _all_netns():
        m = _NETNS_RE.match(ns)
        if m:
            by_prefix.setdefault(m.group(1), []).append(ns)
    runs: dict[str, RunInfo] = {}
    if _state_dir().is_dir():
        for path in sorted(_state_dir().glob("nl*.json")):
            try:
                st = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            p = st.get("prefix", path.stem)
            runs[p] = RunInfo(p, st.get("case", "?"), st.get("owner_pid"),
                              tuple(by_prefix.pop(p, [])))
    for p, nss in by_prefix.items():
        runs[p] = RunInfo(p, None, None, tuple(nss))
    return sorted(runs.values(), key=lambda r: r.prefix)


def down(prefix: str) -> list[str]:
    """Remove one run (its namespaces and state file); returns the namespaces removed."""
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"not a natlab prefix: {prefix!r}")
    nss = [ns for ns in _all_netns() if ns.startswith(prefix + "-")]
    # Routers and hosts first, the internet last (order does not matter to the kernel,
    # it just reads better in logs).
    nss.sort(key=lambda ns: ns.endswith("-inet"))
    errors = [e for ns in nss if (e := _delete_netns(ns))]
    if errors:
        raise TestbedError("; ".join(errors))
    _state_path(prefix).unlink(missing_ok=True)
    return nss


def down_all(*, include_running: bool = False) -> list[str]:
    """Remove leftovers: crashed, orphaned and hand-made runs (also live ones if asked)."""
    removed: list[str] = []
    for run in list_runs():
        if run.state == "running" and not include_running:
            continue
        removed += down(run.prefix)
    return removed


# --- the `natlab` command -------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="natlab", description="Network-namespace NAT testbed (needs root).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a case and leave it running")
    up.add_argument("case", choices=sorted(CASES))
    up.add_argument("--prefix", help="use this run prefix (nl + 6 hex digits)")
    dn = sub.add_parser("down", help="remove hand-made testbeds, one prefix, or leftovers")
    dn.add_argument("prefix", nargs="?", help="the run to remove")
    dn.add_argument("--all", action="store_true",
                    help="also remove crashed and orphaned runs (not live test runs)")
    dn.add_argument("--force", action="store_true", help="with --all: live runs too")
    sub.add_parser("list", help="list testbeds and their state")
    sub.add_parser("cases", help="list the named cases")
    args = parser.parse_args(argv)

    if args.cmd == "cases":
        for name, spec in CASES.items():
            lans = ", ".join(f"{lan.name}({lan.nat.value}: {' '.join(lan.hosts)})"
                             for lan in spec.lans)
            print(f"{name:<28} public: {' '.join(h.name for h in spec.public)}"
                  + (f"; {lans}" if lans else ""))
        return 0
    reason = unavailable_reason()
    if reason is not None:
        print(f"natlab: {reason}", file=sys.stderr)
        return 2
    if args.cmd == "up":
        tb = Testbed.create(args.case, prefix=args.prefix, owner_pid=None)
        print(tb.describe())
        return 0
    if args.cmd == "list":
        runs = list_runs()
        if not runs:
            print("no natlab testbeds")
        for r in runs:
            pid = "" if r.owner_pid is None else f" pid={r.owner_pid}"
            print(f"{r.prefix}  {r.state:<8} {r.case or '-'}{pid}  {' '.join(r.namespaces)}")
        return 0
    # down
    if args.prefix:
        removed = down(args.prefix)
    elif args.all:
        removed = down_all(include_running=args.force)
    else:
        removed = []
        for r in list_runs():
            if r.state == "manual":
                removed += down(r.prefix)
    print(f"removed {len(removed)} namespaces" + (f": {' '.join(removed)}" if removed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
