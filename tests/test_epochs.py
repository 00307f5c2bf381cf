"""The epoch rule (kvmrr_log.epochs) and the takeover's states (replayer.takeover), without
Kafka: what every reader of the log keeps and what it ignores."""
import pytest

from kvmrr_log.epochs import EpochBounds, EpochRule
from kvmrr_log.kafka import KafkaLogError
from replayer.takeover import BadTransition, Event, State, next_state


def batch(epoch, seq):
    return {"kind": "EventBatch", "first_seq": seq, "events": [], "epoch": epoch}


def seal(epoch, writer="b1"):
    return {"kind": "Epoch", "epoch": epoch, "writer": writer, "wall_ns": 0}


def test_records_of_an_older_epoch_after_a_seal_are_void():
    rule = EpochRule()
    log = [batch(0, 0), batch(0, 1), seal(1), batch(0, 2), batch(1, 2), batch(0, 3),
           batch(1, 3)]
    kept = [(r["kind"], r.get("first_seq")) for i, r in enumerate(log) if rule.admit(r, i)]
    assert kept == [("EventBatch", 0), ("EventBatch", 1), ("Epoch", None),
                    ("EventBatch", 2), ("EventBatch", 3)]
    assert rule.epoch == 1 and rule.void == 2


def test_the_first_epoch_record_of_a_number_wins():
    rule = EpochRule()
    log = [batch(0, 0), seal(1, "b1"), seal(1, "b2"), batch(1, 1), seal(2, "b2"),
           seal(1, "b3")]
    kept = [r.get("writer") for i, r in enumerate(log) if rule.admit(r, i)]
    assert kept == [None, "b1", None, "b2"]
    assert rule.epoch == 2 and rule.void == 2


def test_a_record_of_an_unsealed_epoch_is_refused():
    with pytest.raises(KafkaLogError, match="offset 7: a EventBatch of epoch 2"):
        EpochRule(1).admit(batch(2, 0), 7)


def test_releases_and_snapshots_are_valid_only_before_the_next_seal():
    bounds = EpochBounds(read_to=0)
    assert bounds.add(1, 10) and not bounds.add(1, 12) and bounds.add(2, 20)
    bounds.read_to = 25
    assert bounds.precedes_next_epoch(0, 9) is True
    assert bounds.precedes_next_epoch(0, 11) is False      # the old primary after the seal
    assert bounds.precedes_next_epoch(1, 15) is True
    assert bounds.precedes_next_epoch(2, 24) is True
    assert bounds.precedes_next_epoch(2, 30) is None       # not read that far yet
    assert bounds.precedes_next_epoch(3, 30) is None       # an epoch not read yet
    assert bounds.snapshot_valid({"epoch": 0, "log_offset": 10})
    assert not bounds.snapshot_valid({"epoch": 0, "log_offset": 11})
    assert bounds.snapshot_valid({"epoch": 2, "log_offset": 24})


def test_takeover_walks_its_states():
    path = [Event.PRIMARY_SILENT, Event.WRITER_READY, Event.SEALED, Event.OWN_EPOCH_READ]
    state = State.FOLLOWING
    for event in path:
        state = next_state(state, event)
    assert state is State.LIVE
    lost = next_state(next_state(next_state(next_state(
        State.FOLLOWING, Event.PRIMARY_SILENT), Event.WRITER_READY), Event.SEALED),
        Event.NEWER_EPOCH_READ)
    assert lost is State.FOLLOWING
    for state in (State.DESIGNATED, State.SEALING, State.CATCHING_UP):
        assert next_state(state, Event.KAFKA_FAILED) is State.FOLLOWING
    with pytest.raises(BadTransition):
        next_state(State.LIVE, Event.KAFKA_FAILED)
    with pytest.raises(BadTransition):
        next_state(State.FOLLOWING, Event.SEALED)
