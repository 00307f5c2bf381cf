"""A backup's takeover as a state machine (docs/ARCHITECTURE.md §6): the states, what moves it, and the
one transition function.  replayer.follow drives it; this module only names the protocol,
so a test can walk it without Kafka.

    Following  --primary_silent-->   Designated   (silent for the failover timeout, and this
                                                   backup holds the succession partition)
    Designated --writer_ready-->     Sealing      (a writer of epoch = the log's epoch + 1)
    Sealing    --sealed-->           CatchingUp   (its Epoch record is in the log)
    CatchingUp --own_epoch_read-->   Live         (everything before it replayed: history;
                                                   .out sealed too, the releases read)
    CatchingUp --newer_epoch_read--> Following    (another sealer's Epoch record came first:
                                                   this one lost, and its record is void)
    CatchingUp --log_ended-->        Following    (the old primary had finished after all)
    any but Live --kafka_failed-->   Following    (Kafka cannot finish it now: a broker
                                                   died, the leader is moving; decide
                                                   afresh after another silent timeout)
"""
from __future__ import annotations

from enum import Enum


class State(Enum):
    FOLLOWING = "following"
    DESIGNATED = "designated"
    SEALING = "sealing"
    CATCHING_UP = "catching_up"
    LIVE = "live"


class Event(Enum):
    PRIMARY_SILENT = "primary_silent"
    WRITER_READY = "writer_ready"
    SEALED = "sealed"
    OWN_EPOCH_READ = "own_epoch_read"
    NEWER_EPOCH_READ = "newer_epoch_read"
    LOG_ENDED = "log_ended"
    KAFKA_FAILED = "kafka_failed"


_NEXT = {
    (State.FOLLOWING, Event.PRIMARY_SILENT): State.DESIGNATED,
    (State.DESIGNATED, Event.WRITER_READY): State.SEALING,
    (State.SEALING, Event.SEALED): State.CATCHING_UP,
    (State.CATCHING_UP, Event.OWN_EPOCH_READ): State.LIVE,
    (State.CATCHING_UP, Event.NEWER_EPOCH_READ): State.FOLLOWING,
    (State.CATCHING_UP, Event.LOG_ENDED): State.FOLLOWING,
    (State.DESIGNATED, Event.KAFKA_FAILED): State.FOLLOWING,
    (State.SEALING, Event.KAFKA_FAILED): State.FOLLOWING,
    (State.CATCHING_UP, Event.KAFKA_FAILED): State.FOLLOWING,
}


class BadTransition(Exception):
    pass


def next_state(state: State, event: Event) -> State:
    """The one transition function; an event the state does not expect is a bug."""
    try:
        return _NEXT[(state, event)]
    except KeyError:
        raise BadTransition(f"takeover: {event.value} in state {state.value}") from None
