"""plan_links: which transport carries the "cpu" and the "cuda" link, for every combination."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from aiomooncake.core.negotiation import plan_links
from aiomooncake.errors import HandshakeError

ALL = ["nvlink", "rdma", "tcp"]


def info(caps: list[str], transport: str = "auto", host: str | None = "host-a") -> dict[str, Any]:
    d: dict[str, Any] = {"caps": caps, "transport": transport}
    if host is not None:
        d["host_id"] = host
    return d


# ------------------------------------------------------------------------------ auto
def test_auto_same_host_with_nvlink() -> None:
    assert plan_links(info(ALL), info(ALL)) == {"cpu": "rdma", "cuda": "nvlink"}
    assert plan_links(info(["nvlink", "tcp"]), info(["nvlink", "tcp"])) == {"cpu": "tcp", "cuda": "nvlink"}


def test_auto_same_host_nvlink_on_one_side_only() -> None:
    assert plan_links(info(ALL), info(["rdma", "tcp"])) == {"cpu": "rdma", "cuda": "rdma"}
    assert plan_links(info(["tcp"]), info(["nvlink", "tcp"])) == {"cpu": "tcp", "cuda": "tcp"}


def test_auto_cross_host_never_uses_nvlink() -> None:
    assert plan_links(info(ALL, host="a"), info(ALL, host="b")) == {"cpu": "rdma", "cuda": "rdma"}
    assert plan_links(info(["nvlink", "tcp"], host="a"),
                      info(["nvlink", "tcp"], host="b")) == {"cpu": "tcp", "cuda": "tcp"}


@pytest.mark.parametrize(("hc", "hs"), [(None, None), ("", ""), (None, "a"), ("a", None)])
def test_unknown_host_ids_are_not_the_same_host(hc: str | None, hs: str | None) -> None:
    """Two peers that cannot tell their host (no or empty id) must not assume they share one."""
    assert plan_links(info(ALL, host=hc), info(ALL, host=hs))["cuda"] == "rdma"


def test_auto_rdma_on_both() -> None:
    assert plan_links(info(["rdma", "tcp"], host="a"), info(["rdma", "tcp"], host="b")) == {
        "cpu": "rdma", "cuda": "rdma"}


def test_auto_rdma_on_one_side_falls_back_to_tcp() -> None:
    out = plan_links(info(["rdma", "tcp"], host="a"), info(["tcp"], host="b"))
    assert out == {"cpu": "tcp", "cuda": "tcp"}


def test_missing_fields_default_to_auto() -> None:
    assert plan_links({"caps": ["tcp"]}, {"caps": ["tcp"]}) == {"cpu": "tcp", "cuda": "tcp"}


# ---------------------------------------------------------------------------- forced
def test_forced_rdma_with_auto_peer() -> None:
    assert plan_links(info(ALL, "rdma"), info(ALL)) == {"cpu": "rdma", "cuda": "rdma"}
    assert plan_links(info(ALL), info(ALL, "rdma")) == {"cpu": "rdma", "cuda": "rdma"}


def test_forced_tcp_even_when_better_is_possible() -> None:
    assert plan_links(info(ALL, "tcp"), info(ALL, "tcp")) == {"cpu": "tcp", "cuda": "tcp"}


def test_forced_nvlink_same_host() -> None:
    assert plan_links(info(ALL, "nvlink"), info(ALL)) == {"cpu": "rdma", "cuda": "nvlink"}
    assert plan_links(info(["nvlink", "tcp"], "nvlink"), info(["nvlink", "tcp"], "nvlink")) == {
        "cpu": "tcp", "cuda": "nvlink"}


def test_forced_nvlink_across_hosts() -> None:
    with pytest.raises(HandshakeError, match="same host"):
        plan_links(info(ALL, "nvlink", host="a"), info(ALL, "nvlink", host="b"))
    with pytest.raises(HandshakeError, match="same host"):
        plan_links(info(ALL, host="a"), info(ALL, "nvlink", host="b"))


def test_forced_mismatch_names_both() -> None:
    with pytest.raises(HandshakeError) as e:
        plan_links(info(ALL, "rdma"), info(ALL, "tcp"))
    text = str(e.value)
    assert "mismatch" in text
    assert "client" in text and "'rdma'" in text
    assert "server" in text and "'tcp'" in text
    assert text.index("'rdma'") < text.index("'tcp'")  # each value next to the side that asked


@pytest.mark.parametrize(("ccaps", "scaps", "lacking"), [
    (["tcp"], ALL, "client"),
    (ALL, ["tcp"], "server"),
    (["tcp"], ["tcp"], "client and server"),
])
def test_forced_transport_that_a_side_lacks(ccaps: list[str], scaps: list[str], lacking: str) -> None:
    with pytest.raises(HandshakeError) as e:
        plan_links(info(ccaps, "rdma"), info(scaps, "auto"))
    assert f"not available on the {lacking} " in str(e.value)
    assert "'rdma'" in str(e.value)


# ------------------------------------------------------------------------- exhaustive
CAPS = [list(c) for n in range(len(ALL) + 1) for c in itertools.combinations(ALL, n)]
WANTS = ["auto", "tcp", "rdma", "nvlink"]


def _outcome(c: dict[str, Any], s: dict[str, Any]) -> dict[str, str] | str:
    try:
        return plan_links(c, s)
    except HandshakeError:
        return "error"


@pytest.mark.parametrize("same_host", [True, False])
def test_every_combination(same_host: bool) -> None:
    """Both peers evaluate the plan; it must not depend on who is the client, must only use
    transports both sides have, and never nvlink across hosts."""
    seen_ok = seen_err = 0
    for ccaps, scaps, wc, ws in itertools.product(CAPS, CAPS, WANTS, WANTS):
        # every engine can do tcp (engine.capabilities always lists it)
        ccaps_t = ccaps if "tcp" in ccaps else [*ccaps, "tcp"]
        scaps_t = scaps if "tcp" in scaps else [*scaps, "tcp"]
        c = info(ccaps_t, wc, host="h1")
        s = info(scaps_t, ws, host="h1" if same_host else "h2")
        out = _outcome(c, s)
        assert out == _outcome(s, c), (c, s)
        if out == "error":
            seen_err += 1
            continue
        seen_ok += 1
        assert isinstance(out, dict) and set(out) == {"cpu", "cuda"}
        common = set(ccaps_t) & set(scaps_t)
        for link, transport in out.items():
            assert transport in common, (c, s, out)
            if transport == "nvlink":
                assert link == "cuda" and same_host
        assert out["cpu"] != "nvlink"
        forced = {wc, ws} - {"auto"}
        if forced:
            assert len(forced) == 1
            (want,) = forced
            assert out["cuda"] == want
            if want != "nvlink":
                assert out["cpu"] == want
        if wc != "auto" and ws != "auto" and wc != ws:
            raise AssertionError("a forced mismatch was accepted")
    assert seen_ok and seen_err


def test_auto_prefers_the_best_common_transport() -> None:
    for ccaps, scaps in itertools.product(CAPS, CAPS):
        c, s = info([*ccaps, "tcp"], host="h"), info([*scaps, "tcp"], host="h")
        common = set(ccaps) & set(scaps)
        out = plan_links(c, s)
        assert out["cpu"] == ("rdma" if "rdma" in common else "tcp")
        assert out["cuda"] == ("nvlink" if "nvlink" in common else out["cpu"])


# --------------------------------------------------------------------------- malformed
@pytest.mark.parametrize("bad", [
    {"caps": "rdma"},  # a string is not a list of transports (set("rdma") would be letters)
    {"caps": 3},
    {"caps": [["tcp"]]},
    {"caps": [None]},
    {"caps": ["tcp"], "transport": ["rdma"]},
    {"caps": ["tcp"], "transport": 1},
    {"caps": ["tcp"], "transport": None},
    [],
    None,
    "info",
], ids=repr)
def test_malformed_info_is_a_handshake_error(bad: Any) -> None:
    """The info comes from the other peer's HELLO/WELCOME: junk in it must be refused like any
    other disagreement, not crash the handshake with TypeError/AttributeError."""
    for c, s in ((bad, info(ALL)), (info(ALL), bad)):
        with pytest.raises(HandshakeError, match="malformed"):
            plan_links(c, s)


# ------------------------------------------------------------------- same-host CPU path
def shm_info(caps: list[str] | None = None, transport: str = "auto", host: str | None = "host-a",
             host_transport: str | None = None, uid: Any = 1000) -> dict[str, Any]:
    d = info([*(caps if caps is not None else ["tcp"]), "shm"], transport, host)
    if host_transport is not None:
        d["host_transport"] = host_transport
    if uid is not None:
        d["uid"] = uid
    return d


def test_shm_same_host_same_uid_carries_the_cpu_link() -> None:
    assert plan_links(shm_info(), shm_info()) == {"cpu": "shm", "cuda": "tcp"}
    assert plan_links(shm_info(ALL), shm_info(ALL)) == {"cpu": "shm", "cuda": "nvlink"}
    assert plan_links(shm_info(["rdma", "tcp"]), shm_info(["rdma", "tcp"])) == {"cpu": "shm", "cuda": "rdma"}


@pytest.mark.parametrize(("c", "s"), [
    (shm_info(host="a"), shm_info(host="b")),  # two hosts
    (shm_info(host=None), shm_info(host=None)),  # hosts unknown
    (shm_info(uid=1000), shm_info(uid=1001)),  # two users
    (shm_info(uid=None), shm_info(uid=None)),  # no uid
    (shm_info(uid="1000"), shm_info(uid="1000")),  # junk uid
    (shm_info(), info(["tcp"])),  # one side cannot
    (shm_info(host_transport="te"), shm_info()),  # one side asks for the Transfer Engine
    (shm_info(transport="tcp"), shm_info()),  # a forced Transfer Engine transport covers the cpu link
    (shm_info(["rdma", "tcp"], transport="rdma"), shm_info(["rdma", "tcp"])),
])
def test_shm_not_used(c: dict[str, Any], s: dict[str, Any]) -> None:
    for a, b in ((c, s), (s, c)):
        assert plan_links(a, b)["cpu"] in ("tcp", "rdma")


def test_shm_with_forced_nvlink_keeps_the_cpu_link() -> None:
    """Forcing nvlink concerns the cuda link; the cpu link still takes the same-host path."""
    assert plan_links(shm_info(ALL, "nvlink"), shm_info(ALL)) == {"cpu": "shm", "cuda": "nvlink"}


def test_shm_forced_wins_over_a_forced_engine_transport() -> None:
    assert plan_links(shm_info(transport="tcp", host_transport="shm"), shm_info(transport="tcp")) == {
        "cpu": "shm", "cuda": "tcp"}


def test_shm_forced_but_impossible_is_an_error() -> None:
    for c, s in ((shm_info(host_transport="shm"), info(["tcp"])),
                 (shm_info(host_transport="shm", uid=1), shm_info(uid=2))):
        for a, b in ((c, s), (s, c)):
            with pytest.raises(HandshakeError, match="host_transport 'shm'"):
                plan_links(a, b)


def test_shm_forced_across_hosts_uses_the_engine() -> None:
    assert plan_links(shm_info(host="a", host_transport="shm"), shm_info(host="b")) == {
        "cpu": "tcp", "cuda": "tcp"}


def test_shm_forced_against_te_is_a_mismatch() -> None:
    with pytest.raises(HandshakeError, match="host transport mismatch"):
        plan_links(shm_info(host_transport="shm"), shm_info(host_transport="te"))


@pytest.mark.parametrize("bad", ["SHM", 1, None, ["shm"]], ids=repr)
def test_shm_malformed_host_transport(bad: Any) -> None:
    d = shm_info()
    d["host_transport"] = bad
    with pytest.raises(HandshakeError, match="malformed"):
        plan_links(d, shm_info())


def test_shm_is_never_a_transfer_engine_transport() -> None:
    """A peer naming "shm" as its (engine) transport cannot put the cuda link on it."""
    with pytest.raises(HandshakeError, match="not available"):
        plan_links(shm_info(transport="shm"), shm_info())


@pytest.mark.parametrize("same_host", [True, False])
def test_shm_every_combination(same_host: bool) -> None:
    """With "shm" in both caps: symmetric, never on the cuda link, only on one host."""
    hts = [None, "auto", "te", "shm"]
    for ccaps, scaps, wc, ws, hc, hs in itertools.product(CAPS, CAPS, WANTS, WANTS, hts, hts):
        c = shm_info([*ccaps, "tcp"], wc, host="h1", host_transport=hc)
        s = shm_info([*scaps, "tcp"], ws, host="h1" if same_host else "h2", host_transport=hs)
        out = _outcome(c, s)
        assert out == _outcome(s, c), (c, s)
        if out == "error":
            continue
        assert isinstance(out, dict)
        assert out["cuda"] != "shm"
        if out["cpu"] == "shm":
            assert same_host and "te" not in (hc, hs)
        elif same_host and "shm" in (hc, hs):
            raise AssertionError(f"host_transport='shm' on one host was not honoured: {c}, {s}")
