"""The names of the structured log events that other programs read: the FT harness, the
demo, the benchmarks and the tests match a node's log lines by their `event` field, never by
message text.  They are a contract, like the `--json` summaries: rename one here and its
readers follow.  Fields named after each one are what it carries.
"""
from __future__ import annotations

# a backup (replayer/follow.py)
READING = "reading"                    # snapshot_icount, offset: it starts reading the log
FOLLOWING = "following"                # icount, lag_instructions, lag_ms: every second
DONE = "done"                          # icount: it replayed the End
LOG_END_UNKNOWN = "log_end_unknown"    # error: Kafka cannot say where the log ends; no takeover
TAKEOVER = "takeover"                  # silent_s, icount: the primary fell silent, taking over
TAKEOVER_ABORTED = "takeover_aborted"  # error: the seal or catch-up failed; following again
SEALED_FIRST_ELSEWHERE = "sealed_first_elsewhere"  # epoch, ours: another backup won
EPOCH = "epoch"                        # epoch, offset: an accepted Epoch record read
LIVE = "live"                          # icount, next_seq, released_seq, takeover_ms...: primary now
DONE_AS_PRIMARY = "done_as_primary"    # icount

# a serving primary (kvmrr record --serve), every second
SERVING = "serving"    # inputs_consumed, inputs_forged, next_input_offset, responses_released, output_commit_*

# any recorder whose commit was fenced by a newer primary (exit 3)
FENCED = "fenced"      # error

# the gateway
LISTENING = "listening"   # host, port: accepting clients

# what a backup's log says that a scenario's narration shows
BACKUP_EVENTS = (READING, TAKEOVER, TAKEOVER_ABORTED, SEALED_FIRST_ELSEWHERE, LIVE,
                 DONE_AS_PRIMARY)
