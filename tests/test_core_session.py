"""The rendezvous state machine, driven by two Session objects wired back to back.

Nothing here touches sockets or memory: frames go from one session's outbox into the other's
``receive`` (through the real wire encoding), and the test plays the adapter's part (accept,
delivered, write_finished) by hand.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any, cast

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aiomooncake.core import messages as m
from aiomooncake.core.messages import Code, decode, encode
from aiomooncake.core.session import (
    MessageArrived,
    RecvComplete,
    RecvFailed,
    RecvMatched,
    RecvOp,
    RecvReleased,
    RecvSpec,
    RecvState,
    SendComplete,
    SendFailed,
    SendOp,
    SendState,
    Session,
    StopWriting,
    WriteRequested,
)
from aiomooncake.errors import (
    AiomooncakeError,
    ConfigurationError,
    MessageMismatch,
    PeerClosed,
    ProtocolError,
    TransferCancelled,
    TransferFailed,
)

ANY = RecvSpec()
BIG = 1 << 20  # a rendezvous-sized message


# =============================================================================== helpers
def wire(msg: m.Message) -> m.Message:
    return decode(msgpack.unpackb(msgpack.packb(encode(msg), use_bin_type=True), raw=False))


def deliver(src: Session, dst: Session) -> list[m.Message]:
    """Move every frame in ``src.outbox`` into ``dst`` (in order, through the wire form)."""
    frames, src.outbox = src.outbox, []
    for f in frames:
        dst.receive(wire(f))
    return frames


def pump(a: Session, b: Session) -> None:
    """Deliver frames both ways until neither side has anything to say."""
    while a.outbox or b.outbox:
        deliver(a, b)
        deliver(b, a)


def events(s: Session) -> list[Any]:
    ev, s.events = s.events, []
    return ev


def types(items: list[Any]) -> list[str]:
    return [type(x).__name__ for x in items]


def send_eager(s: Session, tag: int = 0, data: bytes = b"\x01" * 16, dtype: str = "float32",
               shape: tuple[int, ...] | None = None) -> SendOp:
    shape = shape if shape is not None else (len(data) // 4,)
    return s.post_send(tag, dtype, shape, len(data), "cpu", data)


def send_rts(s: Session, tag: int = 0, nbytes: int = BIG, dtype: str = "float32",
             shape: tuple[int, ...] | None = None, device: str = "cpu") -> SendOp:
    shape = shape if shape is not None else (nbytes // 4,)
    return s.post_send(tag, dtype, shape, nbytes, device, None)


def spec_for(nbytes: int, dtype: str = "float32") -> RecvSpec:
    return RecvSpec(dtype, nbytes // 4)


@pytest.fixture
def pair() -> tuple[Session, Session]:
    """(sender, receiver)."""
    return Session(), Session()


def rendezvous_to_writing(tx: Session, rx: Session, nbytes: int = BIG,
                          addr: int = 0x10_0000) -> tuple[SendOp, RecvOp]:
    """Bring one rendezvous message to the point where the sender is writing."""
    s = send_rts(tx, nbytes=nbytes)
    deliver(tx, rx)
    r = rx.post_recv(0, spec_for(nbytes))
    assert types(events(rx)) == ["MessageArrived", "RecvMatched"]
    rx.accept(r, "cpu", addr, nbytes)
    deliver(rx, tx)
    assert types(events(tx)) == ["WriteRequested"]
    assert s.state is SendState.WRITING and r.state is RecvState.CTS_SENT
    return s, r


# =============================================================================== eager
def test_eager_unexpected_then_recv(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    payload = bytes(range(16))
    s = send_eager(tx, tag=5, data=payload)
    assert s.eager and s.state is SendState.EAGER_SENT
    assert tx.outbox == [m.Eager(s.id, 5, "float32", (4,), payload)]
    assert tx.pending == 1

    deliver(tx, rx)
    assert events(rx) == [MessageArrived(5)]
    assert rx.has_unexpected(5) and not rx.has_unexpected(0)
    assert rx.pending == 0  # an unexpected message is not an operation of ours

    r = rx.post_recv(5, RecvSpec("float32", 4))
    (ev,) = events(rx)
    assert isinstance(ev, RecvMatched) and ev.op is r
    assert r.state is RecvState.MATCHED and r.msg is not None and r.msg.data == payload  # type: ignore[union-attr]
    assert r.remote_op == s.id
    assert not rx.has_unexpected(5)
    assert rx.outbox == []  # nothing is acknowledged before the payload is copied

    rx.delivered(r)
    assert rx.outbox == [m.Ack(s.id)]
    # cast: mypy still narrows r.state to MATCHED (from the assert above) across rx.delivered(r)
    assert events(rx) == [RecvComplete(r)] and cast(RecvState, r.state) is RecvState.DONE
    deliver(rx, tx)
    # cast: likewise s.state, narrowed to EAGER_SENT by the first assert
    assert events(tx) == [SendComplete(s)] and cast(SendState, s.state) is SendState.DONE
    assert tx.pending == rx.pending == 0
    assert tx.outbox == rx.outbox == []


def test_eager_recv_posted_first(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    r = rx.post_recv(0, ANY)
    assert r.state is RecvState.POSTED and rx.pending == 1
    assert events(rx) == [] and rx.outbox == []
    s = send_eager(tx)
    deliver(tx, rx)
    assert types(events(rx)) == ["RecvMatched"]  # no MessageArrived: it was expected
    rx.delivered(r)
    deliver(rx, tx)
    assert events(tx) == [SendComplete(s)]
    assert types(events(rx)) == ["RecvComplete"]


def test_empty_eager_message(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s = tx.post_send(0, "float32", (0, 3), 0, "cpu", b"")
    r = rx.post_recv(0, RecvSpec("float32", 0))
    deliver(tx, rx)
    assert types(events(rx)) == ["RecvMatched"]
    rx.delivered(r)
    deliver(rx, tx)
    assert events(tx) == [SendComplete(s)]


def test_eager_payload_must_match_nbytes(pair: tuple[Session, Session]) -> None:
    tx, _ = pair
    with pytest.raises(ValueError):
        tx.post_send(0, "float32", (4,), 16, "cpu", b"short")
    # the refused send left nothing behind: no frame, no pending op that close() would fail
    assert tx.outbox == [] and tx.pending == 0
    tx.close()
    assert events(tx) == []


def test_is_eager_threshold() -> None:
    s = Session(eager_threshold=100)
    assert s.is_eager(0) and s.is_eager(100) and not s.is_eager(101)
    assert Session().is_eager(64 * 1024) and not Session().is_eager(64 * 1024 + 1)


@pytest.mark.parametrize("tag", [2**63, -(2**63) - 1, True, 1.0, "0", None], ids=repr)
def test_tags_the_wire_cannot_carry_are_refused_locally(pair: tuple[Session, Session], tag: Any) -> None:
    """The peer's decoder rejects such a frame with ProtocolError and drops the connection, failing
    every operation with it; the caller's mistake must surface here, on the call."""
    tx, rx = pair
    with pytest.raises(ConfigurationError, match="tag"):
        send_eager(tx, tag=tag)
    with pytest.raises(ConfigurationError, match="tag"):
        send_rts(tx, tag=tag)
    with pytest.raises(ConfigurationError, match="tag"):
        rx.post_recv(tag, ANY)
    assert tx.outbox == [] and tx.pending == rx.pending == 0


@pytest.mark.parametrize("tag", [2**63 - 1, -(2**63), 0, -1])
def test_extreme_tags_cross_the_wire(pair: tuple[Session, Session], tag: int) -> None:
    tx, rx = pair
    s = send_eager(tx, tag=tag)
    r = rx.post_recv(tag, ANY)
    deliver(tx, rx)
    assert events(rx) == [RecvMatched(r)] and r.remote_op == s.id


def test_shapes_the_wire_cannot_carry_are_refused_locally(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    with pytest.raises(ConfigurationError, match="dimensions"):
        tx.post_send(0, "float32", (1,) * (m.MAX_SHAPE_DIMS + 1), 4, "cpu", b"\0" * 4)
    with pytest.raises(ConfigurationError, match="dimensions"):
        tx.post_send(0, "float32", (1,) * (m.MAX_SHAPE_DIMS + 1), BIG, "cpu", None)
    assert tx.outbox == [] and tx.pending == 0
    tx.post_send(0, "float32", (1,) * m.MAX_SHAPE_DIMS, 4, "cpu", b"\0" * 4)
    deliver(tx, rx)
    assert events(rx) == [MessageArrived(0)]


def test_op_ids_are_unique_and_increasing(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    ids = [send_eager(tx).id, send_rts(tx).id, send_eager(tx).id]
    assert ids == sorted(set(ids))
    rids = [rx.post_recv(0, ANY).id for _ in range(3)]
    assert rids == sorted(set(rids))


# =============================================================================== rendezvous
def test_rendezvous_pulled_by_the_receiver(pair: tuple[Session, Session]) -> None:
    """RTS offers the source; the receiver pulls it and ACKs: no CTS, no DONE."""
    tx, rx = pair
    s = tx.post_send(3, "float32", (BIG // 4,), BIG, "cpu", None, src=0x7F00_0000)
    assert tx.outbox == [m.Rts(s.id, 3, "float32", (BIG // 4,), BIG, "cpu", 0x7F00_0000)]
    deliver(tx, rx)
    r = rx.post_recv(3, spec_for(BIG))
    assert types(events(rx)) == ["MessageArrived", "RecvMatched"]
    assert isinstance(r.msg, m.Rts) and r.msg.src == 0x7F00_0000
    rx.pulled(r)
    assert rx.outbox == [m.Ack(s.id)] and events(rx) == [RecvComplete(r)] and r.state is RecvState.DONE
    deliver(rx, tx)
    assert events(tx) == [SendComplete(s)] and s.state is SendState.DONE
    assert tx.pending == rx.pending == 0


def test_a_pull_offer_may_be_declined_for_the_usual_write(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s = tx.post_send(0, "float32", (BIG // 4,), BIG, "cpu", None, src=0x1000)
    r = rx.post_recv(0, spec_for(BIG))
    deliver(tx, rx)
    events(rx)
    rx.accept(r, "cpu", 0xA000, BIG)
    deliver(rx, tx)
    assert events(tx) == [WriteRequested(s)] and s.state is SendState.WRITING
    tx.write_finished(s)
    deliver(tx, rx)
    assert events(tx) == [SendComplete(s)] and events(rx) == [RecvComplete(r)]


def test_an_ack_ends_a_rendezvous_only_if_it_offered_a_pull(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s = send_rts(tx)  # no source offered
    deliver(tx, rx)
    tx.receive(wire(m.Ack(s.id)))
    assert events(tx) == [] and s.state is SendState.RTS_SENT
    r = rx.post_recv(0, spec_for(BIG))
    events(rx)
    with pytest.raises(RuntimeError, match="pull offer"):
        rx.pulled(r)
    eager = send_eager(tx, tag=1)
    deliver(tx, rx)
    r2 = rx.post_recv(1, ANY)
    with pytest.raises(RuntimeError, match="pull offer"):
        rx.pulled(r2)
    assert eager.state is SendState.EAGER_SENT


def test_a_mismatched_pull_offer_is_refused_before_any_copy(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s = tx.post_send(0, "float32", (BIG // 4,), BIG, "cpu", None, src=0x1000)
    r = rx.post_recv(0, spec_for(BIG // 2))
    deliver(tx, rx)
    assert types(events(rx)) == ["RecvFailed"] and r.state is RecvState.FAILED
    deliver(rx, tx)
    (ev,) = events(tx)
    assert isinstance(ev, SendFailed) and ev.op is s and isinstance(ev.error, MessageMismatch)


def test_rendezvous_full_path(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s = send_rts(tx, tag=2, nbytes=BIG, device="cuda")
    assert not s.eager and s.state is SendState.RTS_SENT
    assert tx.outbox == [m.Rts(s.id, 2, "float32", (BIG // 4,), BIG, "cuda")]

    r = rx.post_recv(2, spec_for(BIG))
    deliver(tx, rx)
    (ev,) = events(rx)
    assert isinstance(ev, RecvMatched) and ev.op is r and isinstance(r.msg, m.Rts)
    assert r.msg.device == "cuda" and rx.outbox == []

    rx.accept(r, "cuda", 0xABC000, BIG, epoch=7, gen=2)
    assert r.state is RecvState.CTS_SENT and r.link == "cuda"
    assert rx.outbox == [m.Cts(s.id, 0xABC000, BIG, "cuda", 7, 2)]
    assert events(rx) == []

    deliver(rx, tx)
    assert events(tx) == [WriteRequested(s)]
    assert (s.addr, s.capacity, s.link, s.state) == (0xABC000, BIG, "cuda", SendState.WRITING)
    assert (s.epoch, s.gen) == (7, 2)  # the receiver's registration state reaches the writer
    assert tx.outbox == []

    tx.write_finished(s)
    assert tx.outbox == [m.Done(s.id)]
    # cast: mypy still narrows s.state to RTS_SENT (from the first assert) across the calls since
    assert events(tx) == [SendComplete(s)] and cast(SendState, s.state) is SendState.DONE

    deliver(tx, rx)
    # cast: likewise r.state, narrowed to CTS_SENT after rx.accept
    assert events(rx) == [RecvComplete(r)] and cast(RecvState, r.state) is RecvState.DONE
    assert tx.pending == rx.pending == 0
    assert tx.outbox == rx.outbox == []


def test_rendezvous_unexpected_first(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s, r = rendezvous_to_writing(tx, rx)
    tx.write_finished(s)
    deliver(tx, rx)
    assert events(tx) == [SendComplete(s)]
    assert events(rx) == [RecvComplete(r)]


def test_capacity_above_the_message_is_fine(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s = send_rts(tx, nbytes=BIG)
    r = rx.post_recv(0, ANY)
    deliver(tx, rx)
    events(rx)
    rx.accept(r, "cpu", 0x1000, 2 * BIG)
    deliver(rx, tx)
    assert events(tx) == [WriteRequested(s)] and s.capacity == 2 * BIG


def test_destination_too_small(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s = send_rts(tx, nbytes=BIG)
    r = rx.post_recv(0, ANY)
    deliver(tx, rx)
    events(rx)
    rx.accept(r, "cpu", 0x1000, BIG - 1)
    deliver(rx, tx)
    # the sender checks the announced capacity: no write is requested, the receiver hears why
    (ev,) = events(tx)
    assert isinstance(ev, SendFailed) and isinstance(ev.error, MessageMismatch)
    assert str(BIG - 1) in str(ev.error) and str(BIG) in str(ev.error)
    assert s.state is SendState.FAILED
    (abort,) = tx.outbox
    assert isinstance(abort, m.Abort) and abort.op == s.id and abort.code is Code.MISMATCH
    deliver(tx, rx)
    (ev,) = events(rx)
    assert isinstance(ev, RecvFailed) and isinstance(ev.error, MessageMismatch) and ev.op is r
    assert r.state is RecvState.FAILED
    assert tx.pending == rx.pending == 0


def test_write_failure_aborts(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s, r = rendezvous_to_writing(tx, rx)
    err = TransferFailed("engine said no")
    tx.write_finished(s, err)
    (ev,) = events(tx)
    assert isinstance(ev, SendFailed) and ev.error is err
    (abort,) = tx.outbox
    assert isinstance(abort, m.Abort) and abort.code is Code.FAILED and "engine said no" in abort.reason
    deliver(tx, rx)
    (ev,) = events(rx)
    assert isinstance(ev, RecvFailed) and ev.op is r and type(ev.error) is TransferFailed
    assert "sender" in str(ev.error) and "engine said no" in str(ev.error)


def test_write_finished_twice_is_ignored(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s, _ = rendezvous_to_writing(tx, rx)
    tx.write_finished(s)
    events(tx)
    tx.outbox.clear()
    tx.write_finished(s)
    tx.write_finished(s, TransferFailed("late"))
    assert events(tx) == [] and tx.outbox == []


# =============================================================================== mismatch
@pytest.mark.parametrize("path", ["eager", "rendezvous"])
@pytest.mark.parametrize(("spec", "word"), [(RecvSpec("int32", 4), "dtype"), (RecvSpec("float32", 5), "size"),
                                            (RecvSpec("float32", None), None), (RecvSpec(None, 5), "size")])
def test_mismatch_fails_both_sides(pair: tuple[Session, Session], path: str, spec: RecvSpec,
                                   word: str | None) -> None:
    tx, rx = pair
    s = send_eager(tx, data=b"\x00" * 16) if path == "eager" else send_rts(tx, nbytes=16)
    r = rx.post_recv(0, spec)
    deliver(tx, rx)
    if word is None:  # dtype-only spec: any size is fine
        assert types(events(rx)) == ["RecvMatched"]
        return
    (ev,) = events(rx)  # no RecvMatched: the adapter never touches a destination
    assert isinstance(ev, RecvFailed) and ev.op is r and isinstance(ev.error, MessageMismatch)
    assert word in str(ev.error) and "no byte was written" in str(ev.error)
    assert r.state is RecvState.FAILED
    (nack,) = rx.outbox
    assert isinstance(nack, m.Nack) and nack.op == s.id and nack.code is Code.MISMATCH
    assert not any(isinstance(f, m.Cts) for f in rx.outbox)
    deliver(rx, tx)
    (ev,) = events(tx)
    assert isinstance(ev, SendFailed) and ev.op is s and isinstance(ev.error, MessageMismatch)
    assert word in str(ev.error)
    assert s.state is SendState.FAILED
    assert tx.pending == rx.pending == 0


def test_mismatch_consumes_the_message(pair: tuple[Session, Session]) -> None:
    """A refused message is gone; the next recv gets the next message, not the refused one."""
    tx, rx = pair
    send_eager(tx, data=b"A" * 16)
    send_eager(tx, data=b"B" * 16)
    deliver(tx, rx)
    events(rx)
    bad = rx.post_recv(0, RecvSpec("int64", 2))
    assert types(events(rx)) == ["RecvFailed"] and bad.state is RecvState.FAILED
    good = rx.post_recv(0, RecvSpec("float32", 4))
    assert types(events(rx)) == ["RecvMatched"]
    assert good.msg is not None and good.msg.data == b"B" * 16  # type: ignore[union-attr]


@pytest.mark.parametrize("spec", [RecvSpec(), RecvSpec("bfloat16"), RecvSpec(numel=6),
                                  RecvSpec("bfloat16", 6)], ids=repr)
def test_specs_that_accept(pair: tuple[Session, Session], spec: RecvSpec) -> None:
    tx, rx = pair
    tx.post_send(0, "bfloat16", (2, 3), 12, "cpu", b"\x00" * 12)
    tx.post_send(0, "bfloat16", (2, 3), BIG, "cuda", None)
    deliver(tx, rx)
    events(rx)
    for _ in range(2):
        r = rx.post_recv(0, spec)
        assert events(rx) == [RecvMatched(r)]


def test_recv_tensor_spec_accepts_anything(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    shapes = [(), (0,), (1, 2, 3), (7,) * 10]
    for i, shape in enumerate(shapes):
        tx.post_send(0, ["uint8", "float64", "complex64", "some_future_dtype"][i], shape, 0, "cpu", b"")
    deliver(tx, rx)
    events(rx)
    for shape in shapes:
        r = rx.post_recv(0, RecvSpec())
        assert events(rx) == [RecvMatched(r)] and r.msg is not None and r.msg.shape == shape


def test_scalar_has_one_element(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    tx.post_send(0, "float32", (), 4, "cpu", b"\x00" * 4)
    deliver(tx, rx)
    events(rx)
    rx.post_recv(0, RecvSpec("float32", 1))
    assert types(events(rx)) == ["RecvMatched"]


# =============================================================================== refuse / misuse
def test_refuse_with_a_local_failure(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s = send_rts(tx)
    r = rx.post_recv(0, ANY)
    deliver(tx, rx)
    events(rx)
    err = TransferFailed("could not allocate")
    rx.refuse(r, err)
    assert events(rx) == [RecvFailed(r, err)]
    (nack,) = rx.outbox
    assert isinstance(nack, m.Nack) and nack.code is Code.FAILED and "could not allocate" in nack.reason
    deliver(rx, tx)
    (ev,) = events(tx)
    assert isinstance(ev, SendFailed) and ev.op is s and type(ev.error) is TransferFailed
    assert "receiver" in str(ev.error)


def test_refuse_with_a_mismatch_says_mismatch(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    send_rts(tx)
    r = rx.post_recv(0, ANY)
    deliver(tx, rx)
    events(rx)
    rx.refuse(r, MessageMismatch("unknown dtype"))
    deliver(rx, tx)
    (ev,) = events(tx)
    assert isinstance(ev, SendFailed) and isinstance(ev.error, MessageMismatch)


def test_adapter_calls_in_the_wrong_state(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    posted = rx.post_recv(9, ANY)
    calls: tuple[Callable[[], object], ...] = (
        lambda: rx.accept(posted, "cpu", 0, 1), lambda: rx.delivered(posted),
        lambda: rx.refuse(posted, TransferFailed("x")))
    for call in calls:
        with pytest.raises(RuntimeError):
            call()
    send_eager(tx)
    send_rts(tx)
    deliver(tx, rx)
    eager_r, rts_r = rx.post_recv(0, ANY), rx.post_recv(0, ANY)
    with pytest.raises(RuntimeError):
        rx.accept(eager_r, "cpu", 0, 16)  # an eager message has no destination to announce
    with pytest.raises(RuntimeError):
        rx.delivered(rts_r)  # a rendezvous message has no payload to deliver
    rx.accept(rts_r, "cpu", 0x1000, BIG)
    rx.outbox.clear()
    with pytest.raises(RuntimeError):
        rx.accept(rts_r, "cpu", 0x1000, BIG)  # no second CTS
    assert rx.outbox == []
    rx.delivered(eager_r)
    with pytest.raises(RuntimeError):
        rx.delivered(eager_r)  # no second ACK


# =============================================================================== recv cancellation
def test_cancel_posted_recv(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    r = rx.post_recv(0, ANY)
    assert rx.cancel_recv(r) is False  # the buffer is safe right away
    assert r.state is RecvState.FAILED
    assert rx.outbox == [] and events(rx) == [] and rx.pending == 0
    s = send_eager(tx)
    deliver(tx, rx)
    assert events(rx) == [MessageArrived(0)]  # the withdrawn recv did not take it
    r2 = rx.post_recv(0, ANY)
    assert events(rx) == [RecvMatched(r2)] and r2.remote_op == s.id
    assert r.msg is None


def test_cancel_one_of_two_posted_recvs(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    first, second = rx.post_recv(0, ANY), rx.post_recv(0, ANY)
    assert rx.cancel_recv(first) is False
    send_eager(tx)
    deliver(tx, rx)
    assert events(rx) == [RecvMatched(second)]


@pytest.mark.parametrize("path", ["eager", "rendezvous"])
def test_cancel_matched_recv(pair: tuple[Session, Session], path: str) -> None:
    tx, rx = pair
    s = send_eager(tx) if path == "eager" else send_rts(tx)
    s2 = send_eager(tx, data=b"\x02" * 16)
    r = rx.post_recv(0, ANY)
    deliver(tx, rx)
    assert types(events(rx)) == ["RecvMatched", "MessageArrived"]
    assert rx.cancel_recv(r) is False  # nothing was announced, nothing can be written
    assert r.state is RecvState.FAILED and events(rx) == []
    (nack,) = rx.outbox
    assert isinstance(nack, m.Nack) and nack.op == s.id and nack.code is Code.CANCELLED
    deliver(rx, tx)
    (ev,) = events(tx)
    assert isinstance(ev, SendFailed) and ev.op is s and isinstance(ev.error, TransferCancelled)
    assert "receiver" in str(ev.error)
    # the adapter may still be preparing: its late calls are refused, not turned into frames
    with pytest.raises(RuntimeError):
        (rx.delivered if path == "eager" else lambda op: rx.accept(op, "cpu", 0, BIG))(r)
    assert rx.outbox == []
    r2 = rx.post_recv(0, ANY)
    assert events(rx) == [RecvMatched(r2)] and r2.remote_op == s2.id


def test_cancel_recv_after_cts_sender_stops(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s, r = rendezvous_to_writing(tx, rx)
    assert rx.cancel_recv(r) is True  # the sender may be writing: wait for RecvReleased
    assert r.state is RecvState.CANCELLING
    assert rx.outbox == [m.RCancel(s.id)] and events(rx) == []
    deliver(rx, tx)
    assert events(tx) == [StopWriting(s)] and s.state is SendState.CANCELLING
    assert tx.outbox == []  # the final word waits until the writes settled
    tx.write_finished(s, TransferCancelled("stopped before every byte was written"))
    (ev,) = events(tx)
    assert isinstance(ev, SendFailed) and isinstance(ev.error, TransferCancelled)
    assert "receiver" in str(ev.error)
    (abort,) = tx.outbox
    assert isinstance(abort, m.Abort) and abort.code is Code.CANCELLED
    deliver(tx, rx)
    assert events(rx) == [RecvReleased(r)]  # no RecvFailed: the caller cancelled, it is told "safe"
    # cast: mypy still narrows r.state to CANCELLING (from the assert above) across deliver()
    assert cast(RecvState, r.state) is RecvState.FAILED
    assert tx.pending == rx.pending == 0


def test_cancel_recv_after_cts_writes_completed_anyway(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s, r = rendezvous_to_writing(tx, rx)
    assert rx.cancel_recv(r) is True
    deliver(rx, tx)
    events(tx)
    tx.write_finished(s)  # every byte had already gone
    assert tx.outbox == [m.Done(s.id)]
    (ev,) = events(tx)
    assert isinstance(ev, SendFailed) and isinstance(ev.error, TransferCancelled)
    deliver(tx, rx)
    assert events(rx) == [RecvReleased(r)]  # released, not completed: the recv was cancelled


def test_cancel_recv_after_the_sender_finished(pair: tuple[Session, Session]) -> None:
    """RCANCEL crosses DONE on the wire."""
    tx, rx = pair
    s, r = rendezvous_to_writing(tx, rx)
    tx.write_finished(s)
    assert events(tx) == [SendComplete(s)]
    assert rx.cancel_recv(r) is True
    deliver(tx, rx)  # DONE arrives at a cancelling recv
    assert events(rx) == [RecvReleased(r)]
    deliver(rx, tx)  # RCANCEL for a finished send: nothing to do
    assert events(tx) == [] and tx.outbox == []


def test_cancel_recv_twice_and_after_the_end(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s, r = rendezvous_to_writing(tx, rx)
    assert rx.cancel_recv(r) is True
    rx.outbox.clear()
    assert rx.cancel_recv(r) is True  # still waiting
    assert rx.outbox == []  # one RCANCEL is enough
    done = rx.post_recv(1, ANY)
    send_eager(tx, tag=1)
    tx.write_finished(s)
    deliver(tx, rx)
    assert events(rx) == [RecvMatched(done), RecvReleased(r)]
    rx.delivered(done)
    assert events(rx) == [RecvComplete(done)]
    rx.outbox.clear()
    assert rx.cancel_recv(done) is False
    assert rx.cancel_recv(r) is False  # released by the DONE
    assert rx.outbox == [] and events(rx) == []


# =============================================================================== send cancellation
@pytest.mark.parametrize("path", ["eager", "rendezvous"])
def test_sender_cancels_before_match(pair: tuple[Session, Session], path: str) -> None:
    tx, rx = pair
    s = send_eager(tx) if path == "eager" else send_rts(tx)
    s2 = send_eager(tx, data=b"\x02" * 16)
    assert tx.cancel_send(s) is False  # finished now: nothing of ours is in flight
    assert s.state is SendState.FAILED and events(tx) == []
    assert tx.outbox[-1] == m.Abort(s.id, Code.CANCELLED, "the sender cancelled this message")
    assert tx.pending == 1
    deliver(tx, rx)
    assert events(rx) == [MessageArrived(0), MessageArrived(0)]
    assert rx.has_unexpected(0)  # the second message is still there
    r = rx.post_recv(0, ANY)
    assert events(rx) == [RecvMatched(r)] and r.remote_op == s2.id
    r2 = rx.post_recv(0, ANY)
    assert events(rx) == [] and r2.state is RecvState.POSTED  # the cancelled one is gone for good
    assert rx.outbox == []  # a withdrawn message is not answered


@pytest.mark.parametrize("path", ["eager", "rendezvous"])
def test_sender_cancels_the_only_message(pair: tuple[Session, Session], path: str) -> None:
    tx, rx = pair
    s = send_eager(tx) if path == "eager" else send_rts(tx)
    deliver(tx, rx)
    assert rx.has_unexpected(0)
    tx.cancel_send(s)
    deliver(tx, rx)
    assert not rx.has_unexpected(0)
    assert events(rx) == [MessageArrived(0)]


@pytest.mark.parametrize("path", ["eager", "rendezvous"])
def test_sender_cancels_after_match(pair: tuple[Session, Session], path: str) -> None:
    """The receiver matched (RecvMatched went to the adapter) but has not answered yet."""
    tx, rx = pair
    s = send_eager(tx) if path == "eager" else send_rts(tx)
    r = rx.post_recv(0, ANY)
    deliver(tx, rx)
    assert events(rx) == [RecvMatched(r)]
    assert tx.cancel_send(s) is False
    deliver(tx, rx)
    (ev,) = events(rx)
    assert isinstance(ev, RecvFailed) and ev.op is r and isinstance(ev.error, TransferCancelled)
    assert "sender" in str(ev.error)
    assert r.state is RecvState.FAILED and rx.pending == 0
    with pytest.raises(RuntimeError):  # the adapter must look at the state before answering
        (rx.delivered if path == "eager" else lambda op: rx.accept(op, "cpu", 0, BIG))(r)
    assert rx.outbox == []


def test_sender_cancel_crosses_cts(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s = send_rts(tx)
    r = rx.post_recv(0, ANY)
    deliver(tx, rx)
    events(rx)
    rx.accept(r, "cpu", 0x1000, BIG)
    tx.cancel_send(s)  # ABORT and CTS cross on the wire
    deliver(rx, tx)
    assert events(tx) == []  # the CTS of a withdrawn send is ignored: no write
    assert tx.outbox == [m.Abort(s.id, Code.CANCELLED, "the sender cancelled this message")]
    deliver(tx, rx)
    (ev,) = events(rx)
    assert isinstance(ev, RecvFailed) and isinstance(ev.error, TransferCancelled)


def test_sender_cancels_while_writing(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s, r = rendezvous_to_writing(tx, rx)
    assert tx.cancel_send(s) is True  # writes are in flight: wait for write_finished
    assert s.state is SendState.CANCELLING
    assert tx.outbox == [] and events(tx) == []
    assert tx.cancel_send(s) is True and tx.outbox == []
    tx.write_finished(s, TransferCancelled("stopped before every byte was written"))
    (ev,) = events(tx)
    assert isinstance(ev, SendFailed) and isinstance(ev.error, TransferCancelled)
    (abort,) = tx.outbox
    assert isinstance(abort, m.Abort) and abort.code is Code.CANCELLED
    assert "receiver" not in abort.reason  # the receiver did not cancel anything
    deliver(tx, rx)
    (ev,) = events(rx)
    assert isinstance(ev, RecvFailed) and ev.op is r and isinstance(ev.error, TransferCancelled)
    assert "receiver" not in str(ev.error)


def test_sender_cancels_while_writing_but_writes_completed(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s, r = rendezvous_to_writing(tx, rx)
    assert tx.cancel_send(s) is True
    tx.write_finished(s)  # every byte had already gone: the receiver has its data
    assert tx.outbox == [m.Done(s.id)]
    (ev,) = events(tx)
    assert isinstance(ev, SendFailed) and isinstance(ev.error, TransferCancelled)
    assert "the receiver cancelled" not in str(ev.error)
    deliver(tx, rx)
    assert events(rx) == [RecvComplete(r)]


def test_both_sides_cancel(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s, r = rendezvous_to_writing(tx, rx)
    assert tx.cancel_send(s) is True
    assert rx.cancel_recv(r) is True
    deliver(rx, tx)  # RCANCEL at a sender that is already stopping
    assert events(tx) == []
    tx.write_finished(s, TransferCancelled("stopped"))
    assert types(events(tx)) == ["SendFailed"]
    deliver(tx, rx)
    assert events(rx) == [RecvReleased(r)]
    assert tx.pending == rx.pending == 0


def test_cancel_send_after_the_end(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s = send_eager(tx)
    r = rx.post_recv(0, ANY)
    deliver(tx, rx)
    rx.delivered(r)
    deliver(rx, tx)
    assert types(events(tx)) == ["SendComplete"]
    assert tx.cancel_send(s) is False
    assert tx.outbox == [] and events(tx) == [] and s.state is SendState.DONE


def test_ack_after_sender_cancelled_is_ignored(pair: tuple[Session, Session]) -> None:
    """The receiver delivered the eager payload while the sender's ABORT was on its way."""
    tx, rx = pair
    s = send_eager(tx)
    r = rx.post_recv(0, ANY)
    deliver(tx, rx)
    rx.delivered(r)
    tx.cancel_send(s)
    pump(tx, rx)
    assert events(tx) == []
    assert types(events(rx)) == ["RecvMatched", "RecvComplete"]  # the late ABORT changes nothing


# =============================================================================== close
def test_close_fails_everything_pending(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    # sender: one writing, one stopping (cancelled while writing), others waiting for an answer;
    # receiver: those two with CTS sent, one posted, two matched, one CTS sent, one cancelling
    writing, w_recv = rendezvous_to_writing(tx, rx)
    stopping, s_recv = rendezvous_to_writing(tx, rx)
    assert tx.cancel_send(stopping) is True
    posted = rx.post_recv(7, ANY)
    m_eager, m_rts, cts_r, canc_r = (rx.post_recv(t, ANY) for t in (1, 2, 3, 4))
    waiting = [send_eager(tx, tag=1), send_rts(tx, tag=2), send_rts(tx, tag=3), send_rts(tx, tag=4),
               send_eager(tx, tag=5)]  # nobody waits for tag 5
    deliver(tx, rx)
    events(rx)
    rx.accept(cts_r, "cpu", 0x1000, BIG)
    rx.accept(canc_r, "cpu", 0x2000, BIG)
    assert rx.cancel_recv(canc_r) is True
    assert rx.has_unexpected(5)
    tx.outbox.clear()  # lost with the connection
    rx.outbox.clear()

    err = PeerClosed("connection lost")
    tx.close(err)
    rx.close()
    assert tx.closed is err and isinstance(rx.closed, PeerClosed)
    assert tx.outbox == [] and rx.outbox == []  # nobody to talk to

    tx_ev = events(tx)
    failed = [ev for ev in tx_ev if isinstance(ev, SendFailed)]
    assert sorted(id(ev.op) for ev in failed) == sorted(id(op) for op in [writing, stopping, *waiting])
    assert all(ev.error is err for ev in failed)
    stops = [ev.op for ev in tx_ev if isinstance(ev, StopWriting)]
    assert sorted(map(id, stops)) == sorted(map(id, [writing, stopping]))  # in-flight writes must stop
    assert len(tx_ev) == len(failed) + len(stops)
    assert all(op.state is SendState.FAILED for op in waiting)
    assert tx.pending == 0

    rx_ev = events(rx)
    by_op: dict[int, list[Any]] = defaultdict(list)
    for ev in rx_ev:
        by_op[id(ev.op)].append(ev)
    for op in (w_recv, s_recv, posted, m_eager, m_rts, cts_r):
        (ev,) = by_op[id(op)]
        assert isinstance(ev, RecvFailed) and isinstance(ev.error, PeerClosed)
        assert op.state is RecvState.FAILED
    assert by_op[id(canc_r)] == [RecvReleased(canc_r)]  # the cancelled one is just released
    assert len(rx_ev) == 7
    assert rx.pending == 0 and not rx.has_unexpected(5)


def test_close_is_idempotent_and_keeps_the_first_error(pair: tuple[Session, Session]) -> None:
    tx, _ = pair
    send_eager(tx)
    first = PeerClosed("first")
    tx.close(first)
    assert types(events(tx)) == ["SendFailed"]
    tx.close(PeerClosed("second"))
    tx.close()
    assert events(tx) == [] and tx.closed is first


def test_closed_session_refuses_new_work(pair: tuple[Session, Session]) -> None:
    tx, _ = pair
    tx.close(PeerClosed("gone away"))
    with pytest.raises(PeerClosed, match="gone away"):
        send_eager(tx)
    with pytest.raises(PeerClosed):
        send_rts(tx)
    with pytest.raises(PeerClosed):
        tx.post_recv(0, ANY)
    assert tx.outbox == [] and tx.pending == 0


def test_closed_session_ignores_frames(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    s = send_eager(tx)
    rx.close()
    deliver(tx, rx)
    rx.receive(m.Done(12345))  # would be a protocol error on an open session
    assert events(rx) == [] and rx.outbox == [] and not rx.has_unexpected(0)
    assert s.state is SendState.EAGER_SENT


def test_write_finished_after_close_is_silent(pair: tuple[Session, Session]) -> None:
    """close() already failed the send; the adapter's later write_finished must not fail it again
    nor emit frames on a dead connection."""
    tx, rx = pair
    s, _ = rendezvous_to_writing(tx, rx)
    tx.close()
    assert types(events(tx)) == ["StopWriting", "SendFailed"]
    tx.write_finished(s, TransferCancelled("stopped"))
    tx.write_finished(s)
    assert events(tx) == [] and tx.outbox == []
    assert s.state is SendState.FAILED


def test_adapter_calls_after_close(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    send_rts(tx)
    send_eager(tx)
    r_rts, r_eager = rx.post_recv(0, ANY), rx.post_recv(0, ANY)
    deliver(tx, rx)
    events(rx)
    rx.close()
    assert types(events(rx)) == ["RecvFailed", "RecvFailed"]
    calls: tuple[Callable[[], object], ...] = (lambda: rx.accept(r_rts, "cpu", 0, BIG),
                                               lambda: rx.delivered(r_eager))
    for call in calls:
        with pytest.raises(RuntimeError):
            call()
    assert rx.cancel_recv(r_rts) is False and rx.cancel_recv(r_eager) is False
    assert rx.outbox == [] and events(rx) == []


# =============================================================================== protocol errors
def test_duplicate_op_id_while_unexpected(pair: tuple[Session, Session]) -> None:
    _, rx = pair
    rx.receive(m.Eager(1, 0, "uint8", (1,), b"x"))
    with pytest.raises(ProtocolError, match="duplicate"):
        rx.receive(m.Eager(1, 0, "uint8", (1,), b"y"))
    with pytest.raises(ProtocolError, match="duplicate"):
        rx.receive(m.Rts(1, 3, "uint8", (BIG,), BIG, "cpu"))  # another tag, same id


def test_duplicate_op_id_while_matched(pair: tuple[Session, Session]) -> None:
    _, rx = pair
    r = rx.post_recv(0, ANY)
    rx.receive(m.Rts(1, 0, "uint8", (BIG,), BIG, "cpu"))
    assert events(rx) == [RecvMatched(r)]
    rx.post_recv(0, ANY)
    with pytest.raises(ProtocolError, match="duplicate"):
        rx.receive(m.Rts(1, 0, "uint8", (BIG,), BIG, "cpu"))
    rx.accept(r, "cpu", 0x1000, BIG)
    with pytest.raises(ProtocolError, match="duplicate"):
        rx.receive(m.Eager(1, 0, "uint8", (1,), b"x"))


def test_done_for_an_unmatched_message(pair: tuple[Session, Session]) -> None:
    _, rx = pair
    rx.receive(m.Rts(1, 0, "uint8", (BIG,), BIG, "cpu"))
    with pytest.raises(ProtocolError, match="never accepted"):
        rx.receive(m.Done(1))


def test_done_before_cts(pair: tuple[Session, Session]) -> None:
    _, rx = pair
    rx.post_recv(0, ANY)
    rx.receive(m.Rts(1, 0, "uint8", (BIG,), BIG, "cpu"))
    with pytest.raises(ProtocolError, match="before its CTS"):
        rx.receive(m.Done(1))


@pytest.mark.parametrize("frame", [m.Hello(1, {}), m.Welcome(1, {}), m.Ready({}), m.Refuse("x"), m.Ping(1.0),
                                   m.Pong(1.0), m.Bye("x")], ids=lambda f: type(f).__name__)
def test_non_data_frames_are_protocol_errors(pair: tuple[Session, Session], frame: m.Message) -> None:
    _, rx = pair
    with pytest.raises(ProtocolError):
        rx.receive(frame)


@pytest.mark.parametrize("frame", [m.Ack(99), m.Nack(99, Code.FAILED, "x"), m.Cts(99, 0, BIG, "cpu"),
                                   m.Done(99), m.Abort(99, Code.CANCELLED, "x"), m.RCancel(99)],
                         ids=lambda f: type(f).__name__)
def test_frames_for_unknown_ops_are_ignored(pair: tuple[Session, Session], frame: m.Message) -> None:
    """Stale answers are normal after a cancellation race; they must change nothing."""
    tx, rx = pair
    s = send_rts(tx)
    r = rx.post_recv(0, ANY)
    tx.outbox.clear()
    for side in (tx, rx):
        side.receive(frame)
        assert events(side) == [] and side.outbox == []
    assert s.state is SendState.RTS_SENT and r.state is RecvState.POSTED


def test_answers_that_do_not_fit_the_send_are_ignored(pair: tuple[Session, Session]) -> None:
    tx, _ = pair
    e = send_eager(tx)
    rts = send_rts(tx)
    tx.outbox.clear()
    tx.receive(m.Cts(e.id, 0, BIG, "cpu"))  # CTS for an eager message
    tx.receive(m.Ack(rts.id))  # ACK for a rendezvous message
    tx.receive(m.RCancel(rts.id))  # RCANCEL before any CTS
    assert events(tx) == [] and tx.outbox == []
    assert e.state is SendState.EAGER_SENT and rts.state is SendState.RTS_SENT
    tx.receive(m.Cts(rts.id, 0x1000, BIG, "cpu"))
    assert events(tx) == [WriteRequested(rts)]
    tx.receive(m.Cts(rts.id, 0x9000, BIG, "cuda"))  # a second CTS changes nothing
    tx.receive(m.Nack(rts.id, Code.FAILED, "late"))  # nor does a NACK once writing
    assert events(tx) == [] and tx.outbox == []
    assert (rts.addr, rts.link, rts.state) == (0x1000, "cpu", SendState.WRITING)


# =============================================================================== scale
def test_hundreds_of_ops_in_flight_unexpected_first(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    sends: dict[int, list[tuple[SendOp, bytes | None]]] = defaultdict(list)
    for i in range(300):
        tag = i % 3
        if i % 2:
            payload = i.to_bytes(4, "little") * 4
            sends[tag].append((send_eager(tx, tag=tag, data=payload), payload))
        else:
            sends[tag].append((send_rts(tx, tag=tag, nbytes=BIG + i), None))
    assert tx.pending == 300 and len({s.id for q in sends.values() for s, _ in q}) == 300
    deliver(tx, rx)
    assert len(events(rx)) == 300  # 300 MessageArrived
    recvs: list[tuple[RecvOp, SendOp, bytes | None]] = []
    for tag in (2, 0, 1):  # post per tag, in another tag order than the sends
        for s, data in sends[tag]:
            r = rx.post_recv(tag, ANY)
            assert events(rx) == [RecvMatched(r)]
            assert r.remote_op == s.id  # FIFO within the tag
            recvs.append((r, s, data))
    assert not any(rx.has_unexpected(t) for t in range(3))
    for i, (r, s, data) in enumerate(recvs):
        if data is not None:
            assert r.msg.data == data  # type: ignore[union-attr]
            rx.delivered(r)
        else:
            assert r.msg.nbytes == s.nbytes  # type: ignore[union-attr]
            rx.accept(r, "cpu", 0x1000_0000 * (i + 1), s.nbytes)
    deliver(rx, tx)
    tx_ev = events(tx)
    assert types(tx_ev).count("SendComplete") == 150  # the ACKed eager ones
    writes = [ev.op for ev in tx_ev if isinstance(ev, WriteRequested)]
    assert len(writes) == 150
    assert len({op.addr for op in writes}) == 150  # each write goes to its own receiver
    for op in writes:
        tx.write_finished(op)
    deliver(tx, rx)
    assert types(events(tx)) == ["SendComplete"] * 150
    rx_ev = events(rx)
    assert types(rx_ev).count("RecvComplete") == 300
    assert tx.pending == rx.pending == 0


def test_hundreds_of_recvs_posted_first(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    recvs = [rx.post_recv(i % 5, ANY) for i in range(400)]
    assert rx.pending == 400
    sends = [send_eager(tx, tag=i % 5, data=i.to_bytes(4, "little")) for i in range(400)]
    deliver(tx, rx)
    matched = [ev.op for ev in events(rx)]
    assert matched == recvs  # the i-th recv of a tag gets the i-th message of that tag
    for r, s in zip(recvs, sends, strict=True):
        assert r.remote_op == s.id
        rx.delivered(r)
    deliver(rx, tx)
    assert [ev.op for ev in events(tx)] == sends


# =============================================================================== randomized
class Adapter:
    """Plays peer.py's part for one session and records what every operation ended as."""

    def __init__(self, name: str, s: Session) -> None:
        self.name = name
        self.s = s
        self.sends: list[SendOp] = []
        self.recvs: list[RecvOp] = []
        self.end: dict[int, list[str]] = defaultdict(list)  # id(op) -> terminal outcomes
        self.errors: dict[int, AiomooncakeError] = {}
        self.to_prepare: list[RecvOp] = []
        self.writing: list[SendOp] = []
        self.addrs: dict[int, int] = {}  # recv op id -> the address its CTS announced
        self.payloads: dict[int, bytes] = {}
        self.closed = False

    def finish(self, op: object, how: str, error: AiomooncakeError | None = None) -> None:
        self.end[id(op)].append(how)
        assert len(self.end[id(op)]) == 1, f"{self.name}: {op} ended twice: {self.end[id(op)]}"
        if error is not None:
            self.errors[id(op)] = error

    def handle(self) -> None:
        for ev in events(self.s):
            if isinstance(ev, SendComplete):
                self.finish(ev.op, "complete")
            elif isinstance(ev, SendFailed):
                self.finish(ev.op, "failed", ev.error)
            elif isinstance(ev, WriteRequested):
                assert ev.op not in self.writing
                self.writing.append(ev.op)
            elif isinstance(ev, StopWriting):
                assert ev.op in self.writing, "StopWriting for a send that is not writing"
            elif isinstance(ev, RecvMatched):
                self.to_prepare.append(ev.op)
            elif isinstance(ev, RecvComplete):
                self.finish(ev.op, "complete")
            elif isinstance(ev, RecvFailed):
                self.finish(ev.op, "failed", ev.error)
            elif isinstance(ev, RecvReleased):
                self.finish(ev.op, "released")
            else:
                assert isinstance(ev, MessageArrived)
        if self.closed:
            assert self.s.outbox == [], f"{self.name} emitted frames after close"

    def open_ops(self, ops: list[Any]) -> list[Any]:
        return [op for op in ops if not self.end[id(op)]]


@st.composite
def scripts(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    steps = st.tuples(
        st.sampled_from(["send_eager", "send_rts", "send_rts", "recv", "recv", "deliver", "deliver",
                         "deliver", "prepare", "write", "cancel_send", "cancel_recv", "close"]),
        st.integers(0, 1),  # which side acts
        st.integers(0, 1000),  # a choice (tag, index, variant)
    )
    return draw(st.lists(steps, min_size=30, max_size=100))


def run_script(script: list[tuple[str, int, int]]) -> None:
    a, b = Adapter("A", Session(eager_threshold=64)), Adapter("B", Session(eager_threshold=64))
    peer = {id(a): b, id(b): a}
    serial = iter(range(1, 10**9))

    def step_deliver(x: Adapter, n: int = 1) -> None:
        y = peer[id(x)]
        for _ in range(n):
            if not x.s.outbox:
                return
            frame = x.s.outbox.pop(0)
            if not y.closed:
                y.s.receive(wire(frame))

    def step_prepare(x: Adapter, choice: int) -> None:
        while x.to_prepare:
            r = x.to_prepare.pop(0)
            if r.state is not RecvState.MATCHED:  # failed or cancelled meanwhile (peer.py checks too)
                continue
            assert r.msg is not None
            if choice % 7 == 0:
                x.s.refuse(r, TransferFailed("no memory"))
            elif isinstance(r.msg, m.Eager):
                x.s.delivered(r)
            else:
                cap = r.msg.nbytes - (1 if choice % 11 == 0 else 0)
                x.addrs[r.id] = 0x1000 * next(serial)
                x.s.accept(r, "cpu", x.addrs[r.id], cap)
            return

    def step_write(x: Adapter, choice: int) -> None:
        if x.writing:
            op = x.writing.pop(choice % len(x.writing))
            err = TransferFailed("engine") if choice % 5 == 0 else None
            if op.state is SendState.CANCELLING and choice % 2:
                err = TransferCancelled("stopped")
            x.s.write_finished(op, err)

    def both_handle() -> None:
        a.handle()
        b.handle()

    for action, side, raw in script:
        choice = (raw * 2654435761 + 97) % 1_000_003  # spread hypothesis' favourite small values
        if action in ("send_eager", "send_rts"):
            side = 0 if choice % 5 else 1  # mostly A sends and B receives, so flows meet
        elif action == "recv":
            side = 1 if choice % 5 else 0
        x = (a, b)[side]
        if x.closed and action in ("send_eager", "send_rts", "recv"):
            continue
        if action == "send_eager":
            data = next(serial).to_bytes(8, "little")
            op = x.s.post_send(choice % 2, "uint8", (8,), 8, "cpu", data)
            x.sends.append(op)
            x.payloads[op.id] = data
        elif action == "send_rts":
            x.sends.append(x.s.post_send(choice % 2, "uint8", (128,), 128, "cpu", None))
        elif action == "recv":
            spec = RecvSpec("uint8", 8) if choice % 13 == 0 else ANY
            x.recvs.append(x.s.post_recv(choice % 2, spec))
        elif action == "deliver":
            step_deliver(x, 1 + choice % 3)
        elif action == "prepare":
            step_prepare(a, choice)
            step_prepare(b, choice)
        elif action == "write":
            step_write(a, choice)
            step_write(b, choice)
        elif action == "cancel_send":
            live = x.open_ops(x.sends)
            if live:
                op = live[choice % len(live)]
                if not x.s.cancel_send(op) and not x.end[id(op)]:
                    x.finish(op, "cancelled")
        elif action == "cancel_recv":
            live = x.open_ops(x.recvs)
            if live:
                op = live[choice % len(live)]
                if not x.s.cancel_recv(op) and not x.end[id(op)]:
                    x.finish(op, "cancelled")
        elif action == "close" and not a.closed and choice % 4 == 0:
            for y in (a, b):
                y.s.close()
                y.s.outbox.clear()  # the connection is gone with whatever was unsent
                y.closed = True
        both_handle()

    # settle: deliver everything, answer every match, finish every write
    for _ in range(1000):
        both_handle()
        busy = False
        for x in (a, b):
            # handle events after every step, as peer.py does: a write must not be finished
            # before the adapter has seen a StopWriting that a delivered frame just raised
            if x.s.outbox:
                step_deliver(x, len(x.s.outbox))
                both_handle()
                busy = True
            if x.to_prepare:
                step_prepare(x, 1)
                both_handle()
                busy = True
            if x.writing:
                step_write(x, 1)
                both_handle()
                busy = True
        if not busy:
            break
    else:
        raise AssertionError("the sessions never settled")
    both_handle()

    if not a.closed:
        check_consistency(a, b)
        check_consistency(b, a)

    # finally the connection goes: everything still open must end, exactly once
    for x in (a, b):
        x.s.close()
        x.closed = True
    both_handle()
    for x in (a, b):
        while x.writing:
            x.s.write_finished(x.writing.pop(), TransferCancelled("stopped"))
            x.handle()
        for any_op in (*x.sends, *x.recvs):
            assert len(x.end[id(any_op)]) == 1, f"{x.name}: {any_op} never ended"
        assert x.s.pending == 0


def check_consistency(tx: Adapter, rx: Adapter) -> None:
    """After settling on an open connection: both sides agree on every message's fate."""
    matched = {r.remote_op: r for r in rx.recvs if r.msg is not None}
    for s in tx.sends:
        end = tx.end[id(s)]
        r = matched.get(s.id)
        if end == ["complete"]:
            assert r is not None, "a send completed without a matching recv"
            assert rx.end[id(r)] in (["complete"], ["released"])
            if not s.eager:
                assert rx.addrs[r.id] == s.addr  # written where the receiver said
        if not end:  # still pending: its message must be waiting at the receiver, unmatched
            assert r is None and rx.s.has_unexpected(s.tag)
    for r in rx.recvs:
        end = rx.end[id(r)]
        if end == ["complete"]:
            assert r.msg is not None
            s = next(x for x in tx.sends if x.id == r.remote_op)
            assert s.tag == r.tag
            assert tx.end[id(s)] in (["complete"], ["cancelled"], ["failed"])
            if tx.end[id(s)] == ["failed"]:  # only the sender's own cancellation, after all bytes went
                assert isinstance(tx.errors[id(s)], TransferCancelled)
            if isinstance(r.msg, m.Eager):
                assert r.msg.data == tx.payloads[s.id]
        if not end:  # still pending on an open, settled connection: posted and unmatched
            assert r.state is RecvState.POSTED
    # within a tag, receives are matched to messages in send order
    last: dict[int, int] = {}
    for r in rx.recvs:
        if r.msg is not None:
            assert r.remote_op > last.get(r.tag, 0)
            last[r.tag] = r.remote_op


@settings(max_examples=400, deadline=None)
@given(scripts())
@example(  # the settle loop once finished a write before seeing the StopWriting raised for it
    script=[("send_eager", 0, 0)] * 3 + [("deliver", 0, 0)] * 2 + [("send_eager", 0, 0)] * 10
    + [("send_rts", 0, 352)] + [("recv", 0, 0)] * 4 + [("recv", 0, 278)] + [("deliver", 0, 0)] * 4
    + [("deliver", 1, 0), ("prepare", 0, 0), ("cancel_recv", 0, 0), ("send_eager", 0, 0), ("deliver", 0, 2)])
def test_random_interleavings(script: list[tuple[str, int, int]]) -> None:
    """Random calls, cancellations and frame deliveries, in both directions at once: every
    operation ends exactly once, the two sides agree, and FIFO per tag holds."""
    run_script(script)


# =============================================================================== after a protocol error
def test_rejected_done_for_unmatched_message_changes_nothing(pair: tuple[Session, Session]) -> None:
    """A frame refused with ProtocolError must leave the session as it was (h11 style): the
    adapter may still look at it, e.g. to close it cleanly."""
    _, rx = pair
    rx.receive(m.Rts(1, 0, "uint8", (BIG,), BIG, "cpu"))
    events(rx)
    with pytest.raises(ProtocolError):
        rx.receive(m.Done(1))
    assert rx.has_unexpected(0)
    r = rx.post_recv(0, ANY)  # the message is still there, consistently
    assert events(rx) == [RecvMatched(r)] and r.remote_op == 1


def test_rejected_done_before_cts_changes_nothing(pair: tuple[Session, Session]) -> None:
    _, rx = pair
    r = rx.post_recv(0, ANY)
    rx.receive(m.Rts(1, 0, "uint8", (BIG,), BIG, "cpu"))
    events(rx)
    with pytest.raises(ProtocolError):
        rx.receive(m.Done(1))
    assert r.state is RecvState.MATCHED and rx.pending == 1
    rx.close()
    assert events(rx) == [RecvFailed(r, rx.closed)]  # type: ignore[arg-type]


# ============================================================ coalesced completions (ACKS, DONES)
def test_acks_complete_a_burst_of_pulled_sends_in_order(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    sends = [tx.post_send(i, "float32", (BIG // 4,), BIG, "cpu", None, src=0x1000 * (i + 1))
             for i in range(3)]
    recvs = [rx.post_recv(i, spec_for(BIG)) for i in range(3)]
    deliver(tx, rx)
    assert types(events(rx)) == ["RecvMatched"] * 3
    for r in recvs:
        rx.pulled(r)
    frames, rx.outbox = rx.outbox, []
    (acks,) = m.coalesce(frames)
    assert acks == m.Acks([s.id for s in sends])
    tx.receive(wire(acks))
    done = events(tx)
    assert types(done) == ["SendComplete"] * 3 and [e.op for e in done] == sends
    assert tx.pending == 0 and rx.pending == 0


def test_dones_complete_a_burst_of_written_receives_refusing_as_alone(pair: tuple[Session, Session]) -> None:
    tx, rx = pair
    writes = [rendezvous_to_writing(tx, rx) for _ in range(3)]
    for s, _ in writes:
        tx.write_finished(s)
    frames, tx.outbox = tx.outbox, []
    (dones,) = m.coalesce(frames)
    assert dones == m.Dones([s.id for s, _ in writes])
    rx.receive(wire(dones))
    ev = events(rx)
    assert types(ev) == ["RecvComplete"] * 3 and [e.op for e in ev] == [r for _, r in writes]
    # a DONES naming a message that was never accepted is refused, as a lone DONE is
    send_rts(tx)
    deliver(tx, rx)
    events(rx)
    with pytest.raises(ProtocolError):
        rx.receive(wire(m.Dones([tx._next_send - 1])))
