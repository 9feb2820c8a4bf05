"""The replica registry across missed heartbeats (issue 20): a replica that stops heartbeating is
dropped, and taken back when it is heard from again (a partition healed, a stopped process
resumed); a controller that did not run for a while expires nobody for it; a deregistered replica
stays gone."""
from trident_rs.serve.registry import EXPIRE_S, ReplicaRegistry


def test_a_replica_heard_from_again_after_expiring_is_taken_back():
    reg = ReplicaRegistry()
    reg.register("a", "decode-w1", "n1", ["0"], now=0.0)
    reg.register("b", "decode-w1", "n2", ["0"], now=0.0)
    reg.bind([("g1", "decode-w1", 0), ("g2", "decode-w1", 1)])
    for t in range(1, 9):  # a heartbeats, b is silent (stopped, or cut off)
        reg.register("a", "decode-w1", "n1", ["0"], now=float(t))
        reg.expire(float(t))
    assert set(reg.replicas) == {"a"} and "b" in reg.expired and "b" not in reg.bound.values()
    assert reg.register("b", "decode-w1", "n2", ["0"], now=9.0)  # back: new again
    assert set(reg.replicas) == {"a", "b"} and not reg.expired
    reg.bind([("g1", "decode-w1", 0), ("g2", "decode-w1", 1)])
    assert set(reg.bound.values()) == {"a", "b"}


def test_a_controller_that_was_not_running_expires_nobody_for_it():
    reg = ReplicaRegistry()
    reg.register("a", "encode-w1", "n1", [], now=0.0)
    reg.expire(1.0)
    assert reg.expire(1.0 + 30.0) == []  # the controller was stopped 30 s: it could not hear anyone
    gone = [r for t in range(32, 32 + int(EXPIRE_S) + 2) for r in reg.expire(float(t))]  # ticks resume
    assert gone == ["a"]  # then a whole interval without a heartbeat


def test_a_deregistered_replica_stays_gone():
    reg = ReplicaRegistry()
    reg.register("a", "encode-w1", "n1", [], now=0.0)
    reg.deregister("a")
    assert not reg.register("a", "encode-w1", "n1", [], now=1.0) and reg.replicas == {}
    assert reg.enabled
