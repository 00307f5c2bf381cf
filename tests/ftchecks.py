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


def assert_secure(ft) -> None:
    """ft ran with security on: every record of its log and .out carries a valid MAC with
    the VM's key (read as the admin, who may read but holds no key)."""
    from kvmrr_log import kafka_config, record_mac
    from kvmrr_log.kafka import scan_topic, topics
    from kvmrr_log.kafka_acls import vm_principal
    assert ft.secrets is not None, "not a secure cluster"
    key = kafka_config.load(ft.conf(vm_principal(ft.vm))).record_key
    assert key, "the VM's replicas hold no record key"
    with ft.as_admin():
        for topic in (topics(ft.vm).log, topics(ft.vm).outputs):
            msgs = list(scan_topic(ft.bootstrap, topic))
            assert msgs, f"nothing on {topic}"
            assert all(record_mac.problem(m, key) is None for m in msgs), topic
