"""A NAT testbed out of Linux network namespaces, veth pairs and nftables.

Owns: building a topology from a declarative `Spec` (a routed public "internet",
private LANs behind NAT routers, carrier-grade NATs in front of some), running commands
and creating sockets inside its namespaces, and removing every trace of it again
(`Testbed.build` is a context manager; `down_all` cleans up after crashed runs). Also
the `natlab` command (`main`).
Must not import libp2p, trio or anything from `lattice.net`: it is plumbing that tests,
benchmarks and developers put daemons into, not part of a daemon. Needs root.

Topology (theory of operation)
------------------------------
::

    ns <p>-inet: "the internet", a router (198.18.0.1 on every link) with one veth per
       |         attachment and a /32 route to each: every packet between two sites
       |         crosses it (one hop, TTL - 1), as between two homes on the real internet
       |-- veth --> ns <p>-bootstrap  eth0 198.18.0.10    (public host)
       |-- veth --> ns <p>-relay      eth0 198.18.0.11    (public host)
       |-- veth --> ns <p>-gw-<lan>   wan0 198.18.0.101   (NAT router, one per LAN)
       |                lan0 198.19.1.1 -- LAN bridge --> ns <p>-a  eth0 198.19.1.10
       `-- veth --> ns <p>-cgn-<c>    wan0 198.18.0.201   (carrier-grade NAT)
                        lan0 198.18.65.1 -- carrier segment (its own range, standing
                        for 100.64.0.0/10) --> ns <p>-gw-<lan> wan0 198.18.65.101 ...

Routers (nftables, table ``ip natlab``) translate what leaves wan0: endpoint-
independent mapping (``masquerade``, which keeps the source port when it is free) for
`Nat.CONE`, a fresh random port for every new connection (``masquerade fully-random``)
for `Nat.SYMMETRIC`. From the WAN they let in what conntrack knows (established,
related) and, by `Filtering`: nothing else (``PORT``: address- and port-dependent,
Linux's own and most home routers'), new connections from an address the inside
endpoint has sent to (``ADDRESS``), or from anyone (``NONE``: a "full cone"); the
last two forward to the inside endpoint the mapped port belongs to (a dynamic map
filled as mappings are made). What is not let in meets `Reject`: ``DROP`` (silence),
``RST`` (no rule on the router's own INPUT, so its kernel answers a SYN to its WAN
address with a RST, as a Linux router without a DROP rule does; forwarded traffic
gets ``reject with tcp reset``), or ``ICMP`` (``reject`` with ICMP port unreachable,
iptables' default REJECT). The counter ``unsolicited`` counts all of it
(`Router.unsolicited_drops`). A rejecting router matters for hole punching: its RST
or ICMP error kills the peer's connecting socket, and a RST also closes the peer's
own NAT entry (docs/natlab.md). `hairpin`: a LAN host dialing the router's WAN
address at a mapped port is forwarded back inside (and masqueraded), as routers with
"NAT loopback" do; without it such a dial meets `Reject`.
Inside a LAN, hosts reach each other directly through the router's LAN bridge, as
through a home router's switch, multicast (mDNS) included. The router's forward chain
accepts lan0 -> lan0 explicitly: where the host kernel has br_netfilter loaded (docker,
for one, loads it; net.bridge.bridge-nf-call-iptables is then 1 in every namespace),
frames switched between two LAN ports traverse the router's forward hook.
A `firewalled` public host has a public address but drops NEW inbound traffic itself.
The internet router silently drops packets for destinations it does not hold, as the
real internet does with private addresses: a dial to a peer's LAN address from
elsewhere hangs until its timeout instead of failing fast (libraries that dial every
advertised address must survive that). ``Spec(unknown_dst="unreachable")`` answers
with ICMP instead.

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
CARRIER_NET_TEMPLATE = "198.18.{n}.0/24"  # carrier segment k: 198.18.(64 + k).0/24
_INET_ADDR = 1  # 198.18.0.1: the internet's router, where unknown destinations die
_PUBLIC_HOST_BASE = 10  # public hosts: 198.18.0.10, .11, ...
_ROUTER_WAN_BASE = 100  # router of LAN n: 198.18.0.(100 + n), or .(100 + n) behind a CGN
_CARRIER_WAN_BASE = 200  # carrier k: 198.18.0.(200 + k)
_CARRIER_NET_BASE = 64
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
    """How a router maps inside endpoints to outside ports."""

    CONE = "cone"  # endpoint-independent mapping, port-preserving (masquerade)
    SYMMETRIC = "symmetric"  # new random port per connection (masquerade fully-random)


class Filtering(enum.Enum):
    """Which new connections from the WAN a router lets in to a mapped port (RFC 4787)."""

    PORT = "port"  # address- and port-dependent: none (Linux conntrack, most homes)
    ADDRESS = "address"  # address-dependent: from IPs the inside endpoint sent to
    NONE = "none"  # endpoint-independent: from anyone ("full cone")


class Reject(enum.Enum):
    """What a router does with what it does not let in."""

    DROP = "drop"  # silence
    RST = "rst"  # TCP RST (its own stack answers on INPUT; tcp reset when forwarding)
    ICMP = "icmp"  # ICMP port unreachable


@dataclasses.dataclass(frozen=True)
class PublicHost:
    name: str
    firewalled: bool = False  # public address, but drops unsolicited inbound itself


@dataclasses.dataclass(frozen=True)
class Lan:
    name: str
    nat: Nat
    hosts: tuple[str, ...]
    filtering: Filtering = Filtering.PORT
    reject: Reject = Reject.DROP
    hairpin: bool = False
    behind: str | None = None  # the name of a `Carrier` (double NAT), or on the internet
    forward: tuple[int, ...] = ()  # TCP ports forwarded to the LAN's first host


@dataclasses.dataclass(frozen=True)
class Carrier:
    """A carrier-grade NAT: its inside is a segment of home routers' WAN ports."""

    name: str
    nat: Nat = Nat.CONE
    filtering: Filtering = Filtering.PORT
    reject: Reject = Reject.DROP


@dataclasses.dataclass(frozen=True)
class Spec:
    """What to build: hosts on the public internet and LANs behind NAT routers."""

    name: str
    public: tuple[PublicHost, ...] = ()
    lans: tuple[Lan, ...] = ()
    carriers: tuple[Carrier, ...] = ()
    # What happens to packets for addresses outside the testbed (e.g. a peer's LAN
    # address dialed from another LAN): "blackhole" drops them silently like the real
    # internet; "unreachable" answers with ICMP so such dials fail at once.
    unknown_dst: str = "blackhole"
    # one-way delay the internet router adds to every packet it forwards, ms (0: none;
    # a userspace delay line, `natlab_delay`, since this kernel has no netem)
    delay_ms: float = 0.0

    def __post_init__(self) -> None:
        names = [h.name for h in self.public] + [h for lan in self.lans for h in lan.hosts]
        roles = (names + ["gw-" + lan.name for lan in self.lans]
                 + ["cgn-" + c.name for c in self.carriers])
        for name in names + [lan.name for lan in self.lans] + [c.name for c in self.carriers]:
            if not _NAME_RE.match(name):
                raise ValueError(f"bad name {name!r}: want [a-z][a-z0-9]{{0,11}}")
        if len(set(roles)) != len(roles) or "inet" in roles:
            raise ValueError(f"names must be unique and not 'inet': {roles}")
        if not 0 <= self.delay_ms <= 500:
            raise ValueError(f"delay_ms must be within [0, 500], got {self.delay_ms}")
        if self.unknown_dst not in ("blackhole", "unreachable"):
            raise ValueError(f"unknown_dst must be blackhole or unreachable: {self.unknown_dst!r}")
        carriers = {c.name for c in self.carriers}
        for lan in self.lans:
            if lan.behind is not None and lan.behind not in carriers:
                raise ValueError(f"LAN {lan.name} is behind unknown carrier {lan.behind!r}")
        if len(self.lans) > 90 or len(self.public) > 80 or len(self.carriers) > 50:
            raise ValueError("too many LANs, carriers or public hosts for the address plan")


def _two_peer_case(name: str, a: Nat | None, b: Nat | None, *,
                   reject: Reject = Reject.DROP, filtering: Filtering = Filtering.PORT,
                   a_filtering: Filtering | None = None) -> Spec:
    public = [PublicHost("bootstrap"), PublicHost("relay")]
    lans = []
    for peer, nat in (("a", a), ("b", b)):
        if nat is None:
            public.append(PublicHost(peer))
        else:
            f = a_filtering if peer == "a" and a_filtering is not None else filtering
            lans.append(Lan(f"lan{peer}", nat, (peer,), filtering=f, reject=reject))
    return Spec(name, tuple(public), tuple(lans))


CARRIER = Carrier("isp")
# Every case but the single LAN has the internet add this one-way delay (ms), as between
# two homes: hole punching is a matter of timing that a sub-millisecond testbed hides
# (a SYN that must cross the other's path inside one one-way delay, docs/natlab.md).
INTERNET_DELAY_MS = 10.0


def _across_internet(spec: Spec) -> Spec:
    """``spec`` with the internet's delay, where its traffic crosses the internet."""
    crosses = bool(spec.public) or len(spec.lans) > 1 or bool(spec.carriers)
    return dataclasses.replace(spec, delay_ms=INTERNET_DELAY_MS) if crosses else spec


CASES: dict[str, Spec] = {
    s.name: _across_internet(s)
    for s in (
        _two_peer_case("public_x_public", None, None),
        _two_peer_case("public_x_cone", None, Nat.CONE),
        _two_peer_case("nat_cone_x_cone", Nat.CONE, Nat.CONE),
        # routers that answer unsolicited SYNs (issue 15): a RST, or ICMP unreachable
        _two_peer_case("nat_cone_x_cone_rst", Nat.CONE, Nat.CONE, reject=Reject.RST),
        _two_peer_case("nat_cone_x_cone_icmp", Nat.CONE, Nat.CONE, reject=Reject.ICMP),
        # filtering: endpoint-independent (a "full cone"), address-dependent
        _two_peer_case("nat_fullcone_x_cone", Nat.CONE, Nat.CONE,
                       a_filtering=Filtering.NONE),
        _two_peer_case("nat_restricted_x_cone", Nat.CONE, Nat.CONE,
                       a_filtering=Filtering.ADDRESS),
        _two_peer_case("nat_cone_x_symmetric", Nat.CONE, Nat.SYMMETRIC),
        _two_peer_case("nat_cone_x_symmetric_rst", Nat.CONE, Nat.SYMMETRIC, reject=Reject.RST),
        _two_peer_case("nat_symmetric_x_symmetric", Nat.SYMMETRIC, Nat.SYMMETRIC),
        Spec(
            "firewalled_x_cone",
            (PublicHost("bootstrap"), PublicHost("relay"), PublicHost("a", firewalled=True)),
            (Lan("lanb", Nat.CONE, ("b",)),),
        ),
        # a home cone NAT behind a carrier-grade cone NAT, against a plain home NAT
        Spec("double_nat_x_cone", (PublicHost("bootstrap"), PublicHost("relay")),
             (Lan("lana", Nat.CONE, ("a",), behind="isp"), Lan("lanb", Nat.CONE, ("b",))),
             (CARRIER,)),
        # two volunteers behind one home NAT, found by peer id (mDNS off)
        Spec("same_nat", (PublicHost("bootstrap"), PublicHost("relay")),
             (Lan("lan", Nat.CONE, ("a", "b")),)),
        Spec("same_nat_hairpin", (PublicHost("bootstrap"), PublicHost("relay")),
             (Lan("lan", Nat.CONE, ("a", "b"), hairpin=True),)),
        # the only public daemon is the bootstrap; every volunteer at home
        Spec("lone_bootstrap", (PublicHost("bootstrap"),),
             (Lan("lana", Nat.CONE, ("a",)), Lan("lanb", Nat.CONE, ("b",)))),
        Spec("lone_bootstrap_rst", (PublicHost("bootstrap"),),
             (Lan("lana", Nat.CONE, ("a",), reject=Reject.RST),
              Lan("lanb", Nat.CONE, ("b",), reject=Reject.RST))),
        # nothing public: every volunteer at home; c forwarded its port on its router
        # (reachable: it can relay), a and b did not
        Spec("none_public", (),
             (Lan("lana", Nat.CONE, ("a",)), Lan("lanb", Nat.CONE, ("b",)),
              Lan("lanc", Nat.CONE, ("c",), forward=(4001,)))),
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
        return "natlab needs root (network namespaces, nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"natlab needs `{tool}`: apt-get install -y iproute2 nftables conntrack"
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
    gateway: Router | None = None  # the NAT in front (of a private host, or of a router
    # behind a carrier-grade NAT)
    _testbed: Testbed | None = dataclasses.field(default=None, repr=False)

    @property
    def public_ip(self) -> str:
        """Where the internet sees this node: the outermost NAT's WAN address."""
        node: Node = self
        while node.gateway is not None:
            node = node.gateway
        return node.addr

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
    filtering: Filtering = Filtering.PORT
    reject: Reject = Reject.DROP
    hairpin: bool = False

    @property
    def wan_addr(self) -> str:
        return self.addr

    def unsolicited_drops(self) -> int:
        """Packets from the WAN refused (dropped or rejected) because no connection of
        ours expected them."""
        return _unsolicited_count(self)

    def conntrack(self) -> str:
        """The router's connection-tracking table (needs the `conntrack` tool)."""
        return self.run(["conntrack", "-L"], check=False).stdout


def _unsolicited_count(node: Node) -> int:
    out = node.run(["nft", "list", "counter", "ip", "natlab", "unsolicited"]).stdout
    m = re.search(r"packets (\d+)", out)
    if m is None:
        raise TestbedError(f"no unsolicited counter in {node.netns}:\n{out}")
    return int(m.group(1))


def router_rules(wan: str, nat: Nat, filtering: Filtering, reject: Reject,
                 hairpin: bool, forward: dict[int, str] | None = None) -> str:
    """The nftables ruleset of one NAT router (module docstring); ``forward``: port ->
    inside address, the port forwards a volunteer set up on its router."""
    masq = "masquerade fully-random" if nat is Nat.SYMMETRIC else "masquerade"
    refuse_fwd = {Reject.DROP: ["drop"],
                  Reject.RST: ["meta l4proto tcp reject with tcp reset",
                               "reject with icmp type port-unreachable"],
                  Reject.ICMP: ["reject with icmp type port-unreachable"]}[reject]
    # RST: nothing on INPUT; the router's own stack answers (RST, ICMP for UDP)
    refuse_in = {Reject.DROP: "drop", Reject.RST: "accept",
                 Reject.ICMP: "reject with icmp type port-unreachable"}[reject]
    pre = [f'iifname "wan0" ip daddr {wan} tcp dport {port} dnat ip to {host}:{port}'
           for port, host in (forward or {}).items()]
    if hairpin:
        pre.append(f'iifname "lan0" ip daddr {wan} meta l4proto tcp '
                   "dnat ip to tcp dport map @mapped")
    if filtering is not Filtering.PORT:
        pre.append(f'iifname "wan0" ip daddr {wan} ct state new meta l4proto tcp '
                   "dnat ip to tcp dport map @mapped")
    inbound = {Filtering.PORT: (['iifname "wan0" ct status dnat accept'] if forward else []),
               Filtering.NONE: ['iifname "wan0" ct status dnat accept'],
               Filtering.ADDRESS: ['iifname "wan0" ct status dnat '
                                   "ip daddr . tcp dport . ip saddr @contacted accept"]}[filtering]
    lines = [
        "table ip natlab {",
        "  counter unsolicited {}",
        # mapped port -> the inside endpoint it belongs to; what inside endpoints sent to
        "  map mapped { type inet_service : ipv4_addr . inet_service; "
        "flags dynamic,timeout; timeout 30m; }",
        "  set contacted { type ipv4_addr . inet_service . ipv4_addr; "
        "flags dynamic,timeout; timeout 30m; }",
        "  chain prerouting { type nat hook prerouting priority dstnat; policy accept;",
        *(f"    {r}" for r in pre),
        "  }",
        "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;",
        f'    oifname "wan0" {masq}',
        *(['    iifname "lan0" oifname "lan0" ct status dnat masquerade'] if hairpin else []),
        "  }",
        "  chain mappings { type filter hook postrouting priority 110; policy accept;",
        '    oifname "wan0" ct state new meta l4proto tcp update @mapped '
        "{ ct reply proto-dst : ct original ip saddr . ct original proto-src }",
        '    oifname "wan0" ct state new meta l4proto tcp update @contacted '
        "{ ct original ip saddr . ct original proto-src . ct original ip daddr }",
        "  }",
        "  chain input { type filter hook input priority filter; policy accept;",
        '    iifname "wan0" ct state established,related accept',
        f'    iifname "wan0" counter name "unsolicited" {refuse_in}',
        "  }",
        "  chain forward { type filter hook forward priority filter; policy drop;",
        # what conntrack cannot place (e.g. a SYN-ACK out of the window it tracks) would
        # leave untranslated: routers drop it
        "    ct state invalid drop",
        '    iifname "lan0" oifname "lan0" accept',
        '    iifname "lan0" oifname "wan0" accept',
        '    iifname "wan0" ct state established,related accept',
        *(f"    {r}" for r in inbound),
        *(f'    iifname "wan0" counter name "unsolicited" {r}' for r in refuse_fwd),
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


_FIREWALL_RULES = """table ip natlab {
  counter unsolicited {}
  chain input { type filter hook input priority filter; policy accept;
    iifname "lo" accept
    ct state established,related accept
    counter name "unsolicited" drop
  }
  chain forward { type filter hook forward priority filter; policy drop; }
}
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
        self._carriers: dict[str, Router] = {}
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

    def _nft(self, ns: str, rules: str) -> None:
        _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules)

    def _attach(self, ns: str, ifname: str, addr: str) -> None:
        """A veth from the internet router to ``ifname`` in ``ns``, holding ``addr``/32:
        a point-to-point link, so everything ``ns`` sends crosses the internet router."""
        port = f"v{len(self._created)}"
        inet_ip = str(PUBLIC_NET[_INET_ADDR])
        _run(["ip", "-n", self.inet, "link", "add", port, "type", "veth",
              "peer", "name", ifname, "netns", ns])
        _run(["ip", "-n", self.inet, "addr", "add", f"{inet_ip}/32", "dev", port])
        _run(["ip", "-n", self.inet, "link", "set", port, "up"])
        _run(["ip", "-n", self.inet, "route", "add", f"{addr}/32", "dev", port])
        _run(["ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", ifname])
        _run(["ip", "-n", ns, "link", "set", ifname, "up"])
        _run(["ip", "-n", ns, "route", "add", f"{inet_ip}/32", "dev", ifname])
        _run(["ip", "-n", ns, "route", "add", "default", "via", inet_ip, "dev", ifname])

    def _start_delay(self, ms: float) -> None:
        """Every forwarded packet through the delay line (`natlab_delay`); returns once
        it listens. ``bypass``: if it dies, packets pass undelayed rather than vanish."""
        script = Path(__file__).with_name("natlab_delay.py")
        self.internet.popen([sys.executable, str(script), "--ms", str(ms)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10.0
        while "\n" not in self.internet.run(
                ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout:
            if time.monotonic() > deadline:
                raise TestbedError("the delay line did not bind its netfilter queue")
            time.sleep(0.02)
        # iptables' NFQUEUE target: this kernel lacks nft's own queue expression
        _run(["ip", "netns", "exec", self.inet, "iptables", "-w", "-A", "FORWARD", "-j",
              "NFQUEUE", "--queue-num", "0", "--queue-bypass"])

    def _router(self, role: str, wan: str, uplink: tuple[str, str] | None, inside: str,
                nat: Nat, filtering: Filtering, reject: Reject, hairpin: bool,
                lan: str, forward: dict[int, str] | None = None) -> Router:
        """A NAT router: wan0 at ``wan`` on the internet (``uplink`` None) or on a
        carrier segment (``uplink`` = (carrier namespace, its gateway)); lan0 a bridge
        holding the first address of ``inside``."""
        net = ipaddress.ip_network(inside)
        gw_ip = str(net[1])
        ns = self._add_netns(role)
        if uplink is None:
            self._attach(ns, "wan0", wan)
        else:
            carrier_ns, carrier_gw = uplink
            self._plug(carrier_ns, "lan0", f"v-{role[-10:]}", ns, "wan0", f"{wan}/24")
            _run(["ip", "-n", ns, "route", "add", "default", "via", carrier_gw])
        _run(["ip", "-n", ns, "link", "add", "lan0", "type", "bridge"])
        _run(["ip", "-n", ns, "link", "set", "lan0", "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{gw_ip}/{net.prefixlen}", "dev", "lan0"])
        self._sysctl(ns, "net.ipv4.ip_forward", "1")
        self._nft(ns, router_rules(wan, nat, filtering, reject, hairpin, forward))
        return Router(role, ns, wan, "router", lan=lan, nat=nat, lan_addr=gw_ip,
                      lan_net=str(net), filtering=filtering, reject=reject,
                      hairpin=hairpin, _testbed=self)

    def _build(self) -> None:
        self._add_netns("inet")
        _run(["ip", "-n", self.inet, "route", "add", self.spec.unknown_dst, "default"])
        self._sysctl(self.inet, "net.ipv4.ip_forward", "1")
        if self.spec.delay_ms:
            self._start_delay(self.spec.delay_ms)
        # A blackhole route on the sending host itself fails connect() at once (EINVAL);
        # only a router's blackhole makes a SYN vanish. So hosts route via the internet.

        for i, host in enumerate(self.spec.public):
            addr = str(PUBLIC_NET[_PUBLIC_HOST_BASE + i])
            ns = self._add_netns(host.name)
            self._attach(ns, "eth0", addr)
            role = "firewalled" if host.firewalled else "public"
            if host.firewalled:
                self._nft(ns, _FIREWALL_RULES)
            self._nodes[host.name] = Node(host.name, ns, addr, role, _testbed=self)

        uplinks: dict[str, tuple[str, str]] = {}
        for k, c in enumerate(self.spec.carriers, start=1):
            segment = CARRIER_NET_TEMPLATE.format(n=_CARRIER_NET_BASE + k)
            cgn = self._router("cgn-" + c.name, str(PUBLIC_NET[_CARRIER_WAN_BASE + k]), None,
                               segment, c.nat, c.filtering, c.reject, False, c.name)
            self._carriers[c.name] = cgn
            uplinks[c.name] = (cgn.netns, cgn.lan_addr)

        for n, lan in enumerate(self.spec.lans, start=1):
            lan_net = ipaddress.ip_network(LAN_NET_TEMPLATE.format(n=n))
            if lan.behind is None:
                wan, uplink = str(PUBLIC_NET[_ROUTER_WAN_BASE + n]), None
            else:
                carrier = self._carriers[lan.behind]
                wan = str(ipaddress.ip_network(carrier.lan_net)[_ROUTER_WAN_BASE + n])
                uplink = uplinks[lan.behind]
            first = str(lan_net[_LAN_HOST_BASE])
            router = self._router("gw-" + lan.name, wan, uplink, str(lan_net), lan.nat,
                                  lan.filtering, lan.reject, lan.hairpin, lan.name,
                                  {port: first for port in lan.forward})
            if lan.behind is not None:
                router.gateway = self._carriers[lan.behind]
            for j, name in enumerate(lan.hosts):
                addr = str(lan_net[_LAN_HOST_BASE + j])
                ns = self._add_netns(name)
                self._plug(router.netns, "lan0", f"v-{name}", ns, "eth0",
                           f"{addr}/{lan_net.prefixlen}")
                _run(["ip", "-n", ns, "route", "add", "default", "via", router.lan_addr])
                self._nodes[name] = Node(name, ns, addr, "private", lan=lan.name,
                                         gateway=router, _testbed=self)
            self._routers[lan.name] = router

    # -- access

    def host(self, name: str) -> Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise KeyError(f"no host {name!r} in {self.spec.name}: {list(self._nodes)}") from None

    def router(self, lan: str) -> Router:
        return self._routers[lan]

    @property
    def internet(self) -> Node:
        """The internet's router (its namespace), e.g. to add a route or watch traffic."""
        return Node("inet", self.inet, str(PUBLIC_NET[_INET_ADDR]), "internet", _testbed=self)

    def carrier(self, name: str) -> Router:
        return self._carriers[name]

    def hosts(self) -> list[Node]:
        return list(self._nodes.values())

    def routers(self) -> list[Router]:
        """Home routers, then carrier-grade NATs."""
        return list(self._routers.values()) + list(self._carriers.values())

    def namespaces(self) -> list[str]:
        return list(self._created)

    def describe(self) -> str:
        """Human-readable: namespaces, addresses, and how to poke at them."""
        lines = [f"natlab {self.spec.name}  prefix={self.prefix}",
                 f"  {self.inet:<28} internet router, {PUBLIC_NET}, unknown "
                 f"destinations: {self.spec.unknown_dst}, one-way delay "
                 f"{self.spec.delay_ms:g} ms"]
        for node in self.hosts():
            where = f"{node.addr}"
            if node.gateway is not None:
                gw = node.gateway
                where += f"  behind {gw.netns} ({gw.nat.value} NAT, WAN {gw.wan_addr})"
            elif node.role == "firewalled":
                where += "  (public, drops unsolicited inbound)"
            lines.append(f"  {node.netns:<28} {node.role:<10} {where}")
        for r in self.routers():
            up = f", behind {r.gateway.netns}" if r.gateway is not None else ""
            lines.append(f"  {r.netns:<28} router     WAN {r.wan_addr}  LAN {r.lan_addr} "
                         f"({r.lan_net}, {r.nat.value} NAT, {r.filtering.value}-filtering, "
                         f"{r.reject.value}{', hairpin' if r.hairpin else ''}{up})")
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
                lines.append(f"  ip netns exec {priv_gw.netns} nft list table ip natlab")
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


def _lan_words(lan: Lan) -> str:
    words = [lan.nat.value]
    if lan.filtering is not Filtering.PORT:
        words.append(f"{lan.filtering.value}-filtering")
    if lan.reject is not Reject.DROP:
        words.append(lan.reject.value)
    if lan.hairpin:
        words.append("hairpin")
    if lan.forward:
        words.append("forwards " + ",".join(map(str, lan.forward)))
    if lan.behind:
        words.append(f"behind {lan.behind}")
    return " ".join(words)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="natlab", description="Network-namespace NAT testbed (needs root).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a case and leave it running")
    up.add_argument("case", choices=sorted(CASES))
    up.add_argument("--prefix", help="use this run prefix (nl + 6 hex digits)")
    up.add_argument("--delay", type=float, metavar="MS",
                    help="one-way delay of the internet, ms (default: the case's)")
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
            lans = ", ".join(f"{lan.name}({_lan_words(lan)}: {' '.join(lan.hosts)})"
                             for lan in spec.lans)
            print(f"{name:<28} public: {' '.join(h.name for h in spec.public)}"
                  + (f"; {lans}" if lans else ""))
        return 0
    reason = unavailable_reason()
    if reason is not None:
        print(f"natlab: {reason}", file=sys.stderr)
        return 2
    if args.cmd == "up":
        spec = case(args.case)
        if args.delay is not None:
            spec = dataclasses.replace(spec, delay_ms=args.delay)
        tb = Testbed.create(spec, prefix=args.prefix, owner_pid=None)
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
