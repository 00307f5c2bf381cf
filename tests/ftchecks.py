"""What every fault-tolerance scenario must end with (FtCluster.finish()'s figures)."""
from __future__ import annotations


def assert_verified(res: dict, survivors: int) -> None:
    assert res["drained"] and res["lost"] == 0, res
    assert res["duplicated"] == 0 and res["duplicate_releases"] == 0, res
    # every answer came from a valid release on .out, so the releases read back cover
    # them (else the duplicate check above looked at nothing)
    assert res["responses_released"] >= res["answered"] > 0, res
    assert res["client_errors"] == 0, res
    assert res["store_checked"] > 0 and not res["store_mismatches"], res["store_mismatches"]
    assert res["replay"].get("verified"), res["replay_error"]
    assert len(res["survivor_hashes"]) == survivors, \
        {"ends": res["ends"], "stopped": res["stopped"], "attempts": res["takeover_attempts"]}
    assert res["state_match"], (res["survivor_hashes"], res["replay"].get("state_hash"))
