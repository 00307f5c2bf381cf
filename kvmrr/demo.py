"""`make run` until the fault-tolerance demo exists: record kvstore under a client load,
replay the archive with both counters, and say whether each replay matched the record."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from libkvmrr import best_counter
from kvmrr.guests import load_guest
from recorder.archive_sink import ArchiveSink
from recorder.loadgen import KvLoad
from recorder.session import RecordSession
from replayer.session import replay_records
from schemas import read_archive


def run_demo(args) -> int:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    archive = work / "kvstore.avro"
    counter, why = best_counter()
    print(f"kvmrr demo: counter {counter} ({why})", flush=True)
    guest = load_guest("kvstore")
    responses = []

    def on_output(ev: dict) -> None:
        if ev["channel"] == 1:
            responses.append(ev["data"])

    print("recording kvstore for 3,000,000 instructions under a 200 requests/s client...",
          flush=True)

    sink = ArchiveSink(archive)
    rec = RecordSession(guest, sink, counter=counter, vm_id="demo",
                        max_instructions=3_000_000, load=KvLoad(seed=7, rate_hz=200),
                        snapshot_every=1_000_000, on_output=on_output)
    result = rec.run()
    sink.close()
    print(f"  recorded {result.instructions} instructions in {result.seconds:.2f}s: "
          f"{result.events} events {result.events_by_kind}, {len(responses)} responses, "
          f"{archive.stat().st_size} bytes of log", flush=True)
    for r in responses[:3]:
        print(f"    response: {r.decode(errors='replace')}")
    summary = {"record": {"instructions": result.instructions, "events": result.events,
                          "seconds": round(result.seconds, 3),
                          "state_hash": result.state_hash,
                          "outputs_sha256": result.outputs_sha256,
                          "log_bytes": archive.stat().st_size}}
    ok = True
    for mode in ("fast", "step") if counter == "fast" else ("step",):
        t = time.monotonic()
        header, records = read_archive(archive)
        rep = replay_records(header, records, counter=mode)
        match = rep.state_hash == result.state_hash and rep.outputs_sha256 == result.outputs_sha256
        ok &= match
        print(f"  replay ({mode}): {rep.icount} instructions in {time.monotonic() - t:.2f}s, "
              f"state {rep.state_hash} {'==' if match else '!='} record {result.state_hash}",
              flush=True)
        summary[f"replay_{mode}"] = {"state_match": match, "seconds": round(rep.seconds, 3)}
    print("kvmrr demo: " + ("every replay matched the record" if ok else "MISMATCH"))
    print(json.dumps(summary, sort_keys=True))
    sys.stdout.flush()
    return 0 if ok else 1
