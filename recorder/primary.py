"""A primary on Kafka, built one way for `kvmrr record` and for a takeover (docs/ARCHITECTURE.md §6):
its sink, its inputs from .in, its pacer and its RecordSession."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kvmrr_log.guest_images import GuestImage
from recorder.kafka_sink import KafkaSink
from recorder.pacing import BackupPacer, pacer_for
from recorder.service import KafkaInputs
from recorder.session import RecordResult, RecordSession


@dataclass
class Primary:
    session: RecordSession
    sink: KafkaSink
    inputs: KafkaInputs | None
    pacer: BackupPacer | None

    def run(self) -> RecordResult:
        """Record until the guest exits or a budget ends; everything is closed after."""
        try:
            return self.session.run()
        finally:
            if self.inputs:
                self.inputs.close()
            if self.pacer:
                self.pacer.close()
            self.sink.close()


def build_primary(sink: KafkaSink, image: GuestImage, *, counter: str,
                  input_offset: int | None = None, max_backup_lag_ms: float = 0,
                  me: str | None = None, **session_opts) -> Primary:
    """The primary writing through `sink` (already live: KafkaSink.go_live).
    input_offset: where its requests start on .in (None: it serves none).  me: a backup
    taking over, left out of the pacer's view of the backups.  session_opts: the
    RecordSession's (a takeover passes continue_from, next_seq, ...)."""
    inputs = KafkaInputs(sink.bootstrap, sink.vm, input_offset, held_back=sink.held_back) \
        if input_offset is not None else None
    pacer = pacer_for(sink.bootstrap, sink.vm, max_backup_lag_ms, me=me)
    session = RecordSession(image, sink, counter=counter, vm_id=sink.vm, inputs=inputs,
                            pacer=pacer, **session_opts)
    return Primary(session, sink, inputs, pacer)


def record_on_kafka(bootstrap: str, vm: str, image: GuestImage, *, serve: bool, policy,
                    counter: str, max_backup_lag_ms: float = 0,
                    on_output: Callable[[dict], None] | None = None,
                    **session_opts) -> Primary:
    """`kvmrr record --log kafka://...`: the first primary of a VM (epoch 0)."""
    sink = KafkaSink(bootstrap, vm, serve=serve, policy=policy)
    try:
        return build_primary(sink, image, counter=counter,
                             input_offset=0 if serve else None,
                             max_backup_lag_ms=max_backup_lag_ms, on_output=on_output,
                             **session_opts)
    except BaseException:
        sink.close()
        raise
