"""`/lattice/gossip-avg/2`: one pairwise, atomic averaging exchange inside a train job.

Owns the protocol driver, `GossipAverager` (offer -> accept | busy -> tensors both ways
-> commit -> ack, and the ``status`` query that settles an exchange whose ack was lost)
and `serve_gossip_avg`. Beside it, re-exported here: `gossip_transports` (the
`TensorTransport` seam, framed and `/lattice/bulk/2` implementations) and
`gossip_party` (`AveragingParty`: one participant's side, its parameters, when it can
take part, what it committed; `GossipConfig`; the penalties for peers that send
garbage); the wire format is `lattice.core.gossip_messages`. Spec: proto/gossip-avg.md.
Must not import libp2p: it speaks through `lattice.net.streams`. The math is `lattice.learn.gossip`'s
(`ParamChannel.prepare/receive/commit`, `pair_weights`, `pair_average`), run through a
``compute`` callable (a worker thread in the daemon) so the event loop moves bytes only.

Atomicity (the argument is in the spec, section "Commit point"): nothing is mutated
before the commit point; the *responder's receipt of ``commit``* is the commit point.
The responder applies the average only after reading ``commit``; the initiator applies
only after reading ``ack``, or, when the ack is lost, after the responder answers a
``status`` query with ``committed``. A responder that never read ``commit`` records the
exchange as aborted, so a later query cannot flip it. The one remaining window (the
responder applied, the ack was lost and the responder stays unreachable for
``resolve_timeout``) leaves the initiator with its own parameters; it is counted as
``in_doubt_kept``.

Failure policy: a per-peer exchange catches exactly `PeerError` (the peer vanished,
timed out or broke the protocol) and `InvalidTensor` (it sent a bad tensor: we abort,
and penalize it); both leave our parameters untouched. Anything else is a bug and
propagates.
"""

from __future__ import annotations

import enum
import logging
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import trio

from lattice.core.gossip_messages import MAX_CONTROL_BYTES, VERSION, parse_message
from lattice.core.gossip_messages import PROTOCOL as PROTOCOL
from lattice.learn.gossip import Outgoing
from lattice.learn.validate import InvalidTensor
from lattice.net.gossip_party import AveragingParty as AveragingParty
from lattice.net.gossip_party import Compute as Compute
from lattice.net.gossip_party import GossipConfig as GossipConfig
from lattice.net.gossip_party import Held, PeerHealth
from lattice.net.gossip_party import compute_inline as compute_inline
from lattice.net.gossip_party import thread_compute as thread_compute
from lattice.net.gossip_transports import BulkTensorTransport as BulkTensorTransport
from lattice.net.gossip_transports import FramedTensorTransport as FramedTensorTransport
from lattice.net.gossip_transports import TensorTransport as TensorTransport
from lattice.net.streams import (
    CountingStream,
    PeerError,
    PeerNetwork,
    RemoteProtocolError,
    Stream,
    parse_peer_input,
    quietly,
    recv_frame,
    send_frame,
)
from lattice.net.streams import run_both as run_both

log = logging.getLogger("lattice.net.gossip_avg")


class Outcome(str, enum.Enum):
    COMMITTED = "committed"  # both sides applied the average
    BUSY = "busy"            # the peer (or we) could not take part now
    ABORTED = "aborted"      # the peer refused our tensor or aborted; nothing applied
    REJECTED = "rejected"    # we refused the peer's tensor (it is penalized)
    FAILED = "failed"        # the peer vanished, timed out or broke the protocol
    IN_DOUBT_KEPT = "in_doubt_kept"  # ack lost and unresolved: we kept our parameters


# -- messages ---------------------------------------------------------------------------------


def _xid() -> str:
    return secrets.token_hex(16)


async def _receive(stream: Stream, kinds: tuple[str, ...], xid: str | None) -> dict[str, Any]:
    """The peer's next control message, checked (`parse_message`): one of ``kinds``,
    for exchange ``xid``. Anything else raises `RemoteProtocolError`."""
    return parse_peer_input(parse_message, await recv_frame(stream, max_bytes=MAX_CONTROL_BYTES),
                            kinds, xid)


# -- the service ------------------------------------------------------------------------------


class GossipAverager:
    """The running `/lattice/gossip-avg/2` service (what `serve_gossip_avg` hands back)."""

    def __init__(self, network: PeerNetwork, config: GossipConfig, transport: TensorTransport) -> None:
        self.network = network
        self.config = config
        self.transport = transport
        # what we can speak, preferred first; "framed" always works
        self.transports: dict[str, TensorTransport] = {transport.name: transport}
        self.transports.setdefault("framed", FramedTensorTransport())
        self.health = PeerHealth(config)
        self._parties: dict[str, AveragingParty] = {}
        # (initiator, xid) -> "pending" | "committed" | "aborted", oldest first
        self._outcomes: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.counts: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.paused: str | None = None
        """Why this daemon takes part in no exchange now (the volunteer's governor
        paused compute or transfers; set by the job supervisor): offers get ``busy``
        at once instead of being held, and we start none."""

    # registry -----------------------------------------------------------------------------
    def register(self, party: AveragingParty) -> None:
        self._parties[party.job_id] = party

    def unregister(self, job_id: str) -> None:
        party = self._parties.pop(job_id, None)
        if party is not None:
            party.close()

    # initiator ------------------------------------------------------------------------------
    async def average_once(self, party: AveragingParty, candidates: Callable[[], list[str]], *,
                           patience: float, rng: Any) -> str:
        """AD-PSGD style: average with one random live candidate; busy -> try another,
        up to ``offers_per_pass``; then wait idle for a jittered pause (so others can
        reach us) and retry until ``patience`` runs out. Returns "served" (a peer averaged with us
        meanwhile), "committed" or "skipped"."""
        await party.wait_idle()  # an offer held during training is served first
        if party.mixed:
            return "served"
        if self.paused is not None:
            party.stats["skipped"] += 1
            return "skipped"
        deadline = trio.current_time() + patience
        while True:
            now = trio.current_time()
            peers = [p for p in candidates() if p != party.me and not self.health.blocked(p, now)]
            rng.shuffle(peers)
            for peer in peers[:self.config.offers_per_pass]:
                await party.wait_idle()
                if party.mixed:
                    return "served"
                if await self.initiate(party, peer) == Outcome.COMMITTED:
                    return "committed"
            if party.mixed:
                return "served"
            if trio.current_time() >= deadline or not peers:
                party.stats["skipped"] += 1
                return "skipped"
            with trio.move_on_after(rng.uniform(0.5, 1.5) * self.config.retry_pause):
                await party.wait_mixed()
            await party.wait_idle()
            if party.mixed:
                return "served"

    async def initiate(self, party: AveragingParty, peer: str) -> Outcome:
        """One exchange with ``peer``, us initiating. Never raises for the peer's faults."""
        if party.busy_reason() is not None or party.training:
            return Outcome.BUSY
        xid = _xid()
        party.begin(xid)
        try:
            outcome = await self._initiate(party, peer, xid)
        finally:
            party.end()
        self.counts[f"initiated_{outcome.value}"] += 1
        party.stats[outcome.value] += 1
        return outcome

    async def _initiate(self, party: AveragingParty, peer: str, xid: str) -> Outcome:
        cfg = self.config
        try:
            raw = await self.network.open_stream(peer, PROTOCOL)
        except PeerError as e:
            log.debug("peer=%s xid=%s gossip-avg unreachable: %s", peer, xid, e)
            self.health.unreachable(peer, trio.current_time())
            return Outcome.FAILED
        stream = CountingStream(raw)
        commit_sent = False
        out: Outgoing | None = None
        average: np.ndarray | None = None
        try:
            with trio.fail_after(cfg.accept_timeout):
                await send_frame(stream, {"t": "offer", "v": VERSION, "job": party.job_id, "xid": xid,
                                          "samples": party.samples, "codec": party.channel.codec.spec,
                                          "transports": self._offerable(party)})
                reply = await _receive(stream, ("accept", "busy"), xid)
            self.health.reachable(peer)
            if reply["t"] == "busy":
                await quietly(stream.close)
                return Outcome.BUSY
            peer_samples = reply["samples"]
            transport = self.transports.get(reply["transport"])
            if transport is None:
                raise RemoteProtocolError(f"accepted with a transport we did not offer: {reply['transport']}")
            try:
                out, average = await self._trade(stream, party, transport, peer_samples)
            except InvalidTensor as e:
                await self._refuse(stream, party, peer, xid, e)
                return Outcome.REJECTED
            commit_sent = True  # from here on the responder may have applied
            with trio.fail_after(cfg.step_timeout):
                await send_frame(stream, {"t": "commit", "xid": xid})
                final = await _receive(stream, ("ack", "abort"), xid)
            if final["t"] == "abort":
                log.info("peer=%s xid=%s gossip-avg aborted by peer: %s", peer, xid, final["reason"])
                await quietly(stream.close)
                return Outcome.ABORTED
            await self._commit(party, out, average)
            party.partners.add(peer)
            await quietly(stream.close)
            return Outcome.COMMITTED
        except (PeerError, trio.TooSlowError) as e:
            await quietly(stream.reset)
            if isinstance(e, RemoteProtocolError):
                self.health.penalize(peer, "protocol", trio.current_time())
            if not commit_sent:
                log.debug("peer=%s xid=%s gossip-avg failed before commit: %r", peer, xid, e)
                return Outcome.FAILED
            assert out is not None and average is not None
            log.info("peer=%s xid=%s gossip-avg ack lost (%r); asking for the outcome", peer, xid, e)
            if await self._resolve(party, peer, xid):
                await self._commit(party, out, average)
                party.partners.add(peer)
                self.counts["resolved_committed"] += 1
                return Outcome.COMMITTED
            self.counts["resolved_aborted"] += 1
            return Outcome.ABORTED
        finally:
            party.bytes_sent += stream.bytes_sent
            party.bytes_received += stream.bytes_received

    async def _resolve(self, party: AveragingParty, peer: str, xid: str) -> bool:
        """Ask the responder whether it applied ``xid``; True only on ``committed``."""
        delay = 0.05
        with trio.move_on_after(self.config.resolve_timeout):
            while True:
                try:
                    stream = await self.network.open_stream(peer, PROTOCOL)
                    try:
                        await send_frame(stream, {"t": "status", "v": VERSION, "job": party.job_id,
                                                  "xid": xid})
                        reply = await _receive(stream, ("outcome",), xid)
                    finally:
                        await quietly(stream.close)
                    outcome = reply["outcome"]
                    if outcome == "committed":
                        return True
                    if outcome in ("aborted", "unknown"):
                        return False
                    # "pending": the responder has not finished reading the old stream yet
                except PeerError as e:
                    log.debug("peer=%s xid=%s status query failed: %r", peer, xid, e)
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self.counts["in_doubt_kept"] += 1
        party.stats[Outcome.IN_DOUBT_KEPT.value] += 1
        log.warning("peer=%s xid=%s gossip-avg outcome unknown after %.0f s; keeping our parameters",
                    peer, xid, self.config.resolve_timeout)
        return False

    async def _commit(self, party: AveragingParty, out: Outgoing, average: np.ndarray) -> None:
        # Shielded: once the commit is decided, a cancellation must not leave it half-done.
        with trio.CancelScope(shield=True):
            await party.math(lambda: party._apply(out, average))
        party.stats["exchanges"] += 1

    async def _refuse(self, stream: CountingStream, party: AveragingParty, peer: str, xid: str,
                      error: InvalidTensor) -> None:
        self.rejected[error.reason] += 1
        party.stats[f"rejected_{error.reason}"] += 1
        self.health.penalize(peer, f"invalid_tensor:{error.reason}", trio.current_time())
        with trio.move_on_after(self.config.step_timeout):
            await _quietly_send(stream, {"t": "abort", "xid": xid, "reason": f"invalid_tensor:{error.reason}"})
        await quietly(stream.reset)

    # responder ------------------------------------------------------------------------------
    async def handle(self, raw: Stream) -> None:
        """The stream handler: one offer (an exchange) or one status query per stream."""
        peer = raw.remote_peer_id
        stream = CountingStream(raw)
        try:
            with trio.fail_after(self.config.step_timeout):
                first = await _receive(stream, ("offer", "status"), None)
            if first["t"] == "status":
                state = self._outcomes.get((peer, first["xid"]), "unknown")
                await send_frame(stream, {"t": "outcome", "xid": first["xid"], "outcome": state})
                await quietly(stream.close)
                return
            await self._respond(stream, peer, first)
        except (PeerError, trio.TooSlowError) as e:
            if isinstance(e, RemoteProtocolError):
                self.health.penalize(peer, "protocol", trio.current_time())
            log.debug("peer=%s gossip-avg inbound ended: %r", peer, e)
            await quietly(stream.reset)

    async def _respond(self, stream: CountingStream, peer: str, offer: dict[str, Any]) -> None:
        cfg = self.config
        xid = offer["xid"]
        peer_samples = offer["samples"]
        party = self._parties.get(offer["job"])
        reason = None
        if party is None:
            reason = "unknown_job"
        elif peer not in party.roster:
            reason = "not_participant"
        elif self.health.is_penalized(peer, trio.current_time()):
            reason = "penalized"
        elif self.paused is not None:
            reason = "paused"
        elif offer["codec"] != party.channel.codec.spec:
            reason = "codec_mismatch"
        else:
            reason = party.busy_reason()
        transport = self._pick_transport(offer)
        if reason is None and transport is None:
            reason = "transport"
        if reason is None and party is not None and party.training:
            # hold the offer until our round ends (the initiator waits up to accept_timeout)
            held = party.held = Held(xid)
            with trio.move_on_after(cfg.hold_timeout):
                await held.go.wait()
            if held.state != "go":
                held.state = "expired"
                if party.held is held:
                    party.held = None
                reason = "training"
        elif reason is None and party is not None:
            party.begin(xid)
        if reason is not None:
            self.counts[f"busy_{reason}"] += 1
            await send_frame(stream, {"t": "busy", "xid": xid, "reason": reason})
            await quietly(stream.close)
            return
        assert party is not None and transport is not None
        key = (peer, xid)
        self._remember(key, "pending")
        try:
            outcome = await self._respond_exchange(stream, party, peer, xid, peer_samples, transport)
        finally:
            if self._outcomes.get(key) == "pending":
                self._outcomes[key] = "aborted"
            party.end()
            party.bytes_sent += stream.bytes_sent
            party.bytes_received += stream.bytes_received
        self.counts[f"responded_{outcome.value}"] += 1
        party.stats[outcome.value] += 1

    def _offerable(self, party: AveragingParty) -> list[str]:
        """The transports we offer for ``party``'s payload, preferred first. A small
        model's round goes framed on the stream: a bulk session would add a key
        agreement and two round trips (and a side-channel connection) to a payload the
        stream carries in one flight."""
        if party.params.nbytes < self.config.small_payload_bytes:
            return ["framed"]
        return list(self.transports)

    def _pick_transport(self, offer: dict[str, Any]) -> TensorTransport | None:
        """Our preferred transport among those the initiator offered (absent: framed)."""
        return next((t for n, t in self.transports.items() if n in offer["transports"]), None)

    async def _trade(self, stream: CountingStream, party: AveragingParty,
                     transport: TensorTransport, peer_samples: int,
                     ) -> tuple[Outgoing, np.ndarray]:
        """Both sides' middle: prepare ours, swap payloads over ``transport``, mix.
        Returns (what we prepared, the average); raises InvalidTensor when the peer's
        payload fails validation."""
        out = await party.math(lambda: party.channel.prepare(party.params))
        sent_before, received_before = stream.bytes_sent, stream.bytes_received
        with trio.fail_after(self.config.step_timeout):
            payload, sent, received = await transport.exchange(
                stream, out.payload, expect=party.expected_payload(),
                max_bytes=party.max_payload_bytes(self.config))
        # a bulk side channel (raw TCP) carries the arrays past this stream's counters:
        # count the array bytes the stream did not see, so byte figures are the same
        # whichever way the arrays went
        stream.bytes_sent += max(0, sent - (stream.bytes_sent - sent_before))
        stream.bytes_received += max(0, received - (stream.bytes_received - received_before))
        average = await party.math(lambda: party._mix(out, payload, peer_samples))
        return out, average

    async def _respond_exchange(self, stream: CountingStream, party: AveragingParty, peer: str,
                                xid: str, peer_samples: int, transport: TensorTransport) -> Outcome:
        cfg = self.config
        key = (peer, xid)
        try:
            await send_frame(stream, {"t": "accept", "xid": xid, "samples": party.samples,
                                      "transport": transport.name})
            try:
                out, average = await self._trade(stream, party, transport, peer_samples)
            except InvalidTensor as e:
                self._outcomes[key] = "aborted"
                await self._refuse(stream, party, peer, xid, e)
                return Outcome.REJECTED
            with trio.fail_after(cfg.step_timeout):
                decision = await _receive(stream, ("commit", "abort"), xid)
            if decision["t"] == "abort":
                self._outcomes[key] = "aborted"
                log.info("peer=%s xid=%s gossip-avg aborted by initiator: %s", peer, xid, decision["reason"])
                await quietly(stream.close)
                return Outcome.ABORTED
            # The commit point: we apply, remember it, then acknowledge.
            await self._commit(party, out, average)
            self._outcomes[key] = "committed"
            party.partners.add(peer)
            party.note_mixed()
            try:
                with trio.fail_after(cfg.step_timeout):
                    await send_frame(stream, {"t": "ack", "xid": xid})
                await quietly(stream.close)
            except (PeerError, trio.TooSlowError) as e:
                # the initiator will ask (status) on a new stream
                log.info("peer=%s xid=%s gossip-avg ack not delivered: %r", peer, xid, e)
            return Outcome.COMMITTED
        except (PeerError, trio.TooSlowError) as e:
            if self._outcomes.get(key) == "pending":
                self._outcomes[key] = "aborted"
            if isinstance(e, RemoteProtocolError):
                self.health.penalize(peer, "protocol", trio.current_time())
            log.debug("peer=%s xid=%s gossip-avg responder failed: %r", peer, xid, e)
            await quietly(stream.reset)
            return Outcome.FAILED

    def _remember(self, key: tuple[str, str], state: str) -> None:
        self._outcomes[key] = state
        self._outcomes.move_to_end(key)
        while len(self._outcomes) > self.config.outcome_memory:
            self._outcomes.popitem(last=False)

    def statistics(self) -> dict[str, Any]:
        return {
            **self.counts,
            "rejected": dict(self.rejected),
            "jobs": len(self._parties),
            "paused": self.paused,
            "outcomes_remembered": len(self._outcomes),
            **self.health.statistics(trio.current_time()),
            **({"side_channel": self.transport.unreachable.statistics()}
               if isinstance(self.transport, BulkTensorTransport) else {}),
        }



async def _quietly_send(stream: Stream, message: dict[str, Any]) -> None:
    try:
        await send_frame(stream, message)
    except PeerError:
        pass  # best effort: the exchange is over either way


async def serve_gossip_avg(network: PeerNetwork, *, config: GossipConfig = GossipConfig(),
                           transport: TensorTransport | None = None,
                           task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `/lattice/gossip-avg/2` until cancelled; hands back the `GossipAverager`.

    Parties register per job (`GossipAverager.register`); offers for other jobs are
    answered ``busy``. Inbound exchanges run in the network's handler tasks."""
    averager = GossipAverager(network, config, transport or FramedTensorTransport())
    network.set_stream_handler(PROTOCOL, averager.handle)
    task_status.started(averager)
    try:
        await trio.sleep_forever()
    finally:
        for job_id in list(averager._parties):
            averager.unregister(job_id)
