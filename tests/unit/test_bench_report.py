"""docs/benchmarks.md generation: ratios, "not measured", and the run plan."""

from __future__ import annotations

import pytest

from benchmarks import report
from benchmarks.run import make_plan

pytestmark = pytest.mark.unit


def _data(lastmile: dict | None) -> dict:
    plan = make_plan(quick=True)
    mq = {
        "idle": {"mode": "connect", "connect": {"connected": 10_000, "connect_rate": 5000.0,
                                                "connect_latency_ms": {"p99": 20.0}},
                 "rss_per_connection": 700.0, "server_rss_before": 8 << 20,
                 "server_rss_held": 15 << 20, "lost_during_hold": 0, "error_count": 0},
        "qos1_max": {"acked_per_s": 80_000.0, "puback_latency_ms": {"p50": 20.0, "p99": 40.0},
                     "error_count": 0},
    }
    return {
        "quick": True,
        "started": "2026-01-01 00:00:00 +0000",
        "seconds": 60.0,
        "machine": {"cores": 2, "cpu": "x", "ram_gib": 24, "kernel": "6", "python": "3.11"},
        "versions": {"mosquitto": "2.0.11"},
        "plan": report.plan_dict(plan),
        "mosquitto": {"status": "measured", "results": mq},
        "lastmile": lastmile or {"status": "not measured", "reason": "gateway missing"},
    }


def test_not_measured_is_said_never_invented() -> None:
    md = report.markdown(_data(None))
    assert "| idle | connections held (higher is better) | not measured | 10,000 | - |" in md
    assert "lastmile: not measured: gateway missing" in md
    assert "Not measured: Lastmile did not run" in md


def test_ratio_is_lastmile_over_mosquitto() -> None:
    lm = {
        "status": "measured",
        "results": {
            "qos1_max": {"acked_per_s": 20_000.0, "error_count": 0,
                         "puback_latency_ms": {"p50": 40.0, "p99": 100.0},
                         "kafka": {"expected": 10, "unique": 10, "missing": 0, "lost_acked": 0,
                                   "duplicates": 0, "order_violations": 0,
                                   "e2e_latency_ms": {"p50": 1.0, "p99": 2.0}}},
        },
    }
    md = report.markdown(_data(lm))
    assert "| qos1_max | QoS 1 acked msg/s (higher is better) | 20,000 | 80,000 | 0.25x |" in md
    assert "| qos1_max | PUBACK p99 (ms) (lower is better) | 100.00 | 40.00 | 2.50x |" in md
    assert "| qos1_max | 10 | 10 | 0 | 0 | 0 | 0 | 1.0 / 2.0 |" in md


def test_plans_are_bounded() -> None:
    quick, full = make_plan(True), make_plan(False)
    assert quick.idle_connections == 10_000 and full.idle_connections == 40_000
    for plan in (quick, full):
        idle = plan.scenarios[0].args
        # every loadgen process stays under the 20,000 open-file limit
        assert idle["connections"] / idle["procs"] <= 15_000
        # and every source address under the ephemeral port range
        assert idle["connections"] / idle["source-ips"] <= 20_000
        assert plan.idle_connections / plan.gateway_workers <= 15_000
        for sc in plan.scenarios[1:]:
            if sc.mode == "connect":  # as many as one Mosquitto process can hold
                assert sc.args["connections"] < 20_000 and sc.workers
                assert sc.args["connections"] / sc.args["procs"] <= 15_000
                continue
            assert sc.args["connections"] == 100 and sc.args["payload-size"] == 100
            assert sc.args["duration"] <= 15


def test_floors_and_targets_say_met_or_not_met() -> None:
    """The issue 15 table: floors beside PUBACK per spool mode, CPU µs/msg, and each
    target judged against figures of the same run (or "not measured")."""
    lm = {"status": "measured", "results": {
        "qos1_max": {"acked_per_s": 40_000.0, "error_count": 0},
    }}
    data = _data(lm)
    data["mosquitto"]["results"]["qos1_rate"] = {
        "puback_latency_ms": {"p50": 1.6, "p99": 3.5}, "server_cpu_us_per_msg": 13.0}
    data["floors"] = {"kafka": {"delivery_ms": {"p50": 5.0, "p99": 9.9}},
                      "fsync": {"fdatasync_ms": {"p50": 0.18, "p99": 0.34}}}
    data["modes"] = {
        report.MODE_DEFAULT: {"puback_latency_ms": {"p50": 6.5, "p99": 40.0},
                              "server_cpu_us_per_msg": 28.0},
        report.MODE_WRITE_AHEAD: {"puback_latency_ms": {"p50": 2.0, "p99": 9.0},
                                  "server_cpu_us_per_msg": 35.0},
    }
    md = report.markdown(data)
    assert "| Kafka floor: bare producer, acks=all, idempotent, linger 5 ms, delivery report" \
           " | 5.00 | 9.90 | not measured |" in md
    assert "| fsync floor: write 2 KB + fdatasync | 0.18 | 0.34 | not measured |" in md
    assert "| Lastmile PUBACK, spool write-ahead (ack on local fsync) | 2.00 | 9.00 | 35.0 |" in md
    # 9.0 > 2.5 x 3.5 = 8.75: not met; 6.5 <= 5 + 2 and 40 <= 9.9 + 20 is false.
    assert "| write-ahead PUBACK p99 <= 2.5x Mosquitto's p99 (8.75 ms) | 9.00 | **not met** |" in md
    assert "| default mode PUBACK p50 <= Kafka floor p50 + 2 ms (7.00 ms) | 6.50 | met |" in md
    assert "| default mode PUBACK p99 <= Kafka floor p99 + 20 ms (29.90 ms) | 40.00 " \
           "| **not met** |" in md
    assert "(default mode) | 28.0 | met |" in md
    assert "| QoS 1 end to end >= 0.8x Mosquitto's QoS 1 ingest | 0.50x | **not met** |" in md
    assert "| QoS 0 >= 0.4x Mosquitto | not measured | not measured |" in md


def _floors_data() -> dict:
    lm = {"status": "measured", "results": {
        "qos1_max": {"acked_per_s": 29_559.0, "acked": 300_000, "error_count": 0,
                     "cpu_cores": {"server": 1.0, "tansu": 0.2, "loadgen": 0.6, "box": 2.0,
                                   "other": 0.2, "wall_s": 10.0}},
        "qos0_max": {"sent_per_s": 53_472.0, "sent": 500_000, "error_count": 0,
                     "cpu_cores": {"server": 1.1, "tansu": 0.3, "loadgen": 0.5, "box": 1.9,
                                   "other": 0.0, "wall_s": 10.0}},
    }}
    data = _data(lm)
    data["mosquitto"]["results"]["qos1_max"]["acked_per_s"] = 67_319.0
    data["mosquitto"]["results"]["qos0_max"] = {"sent_per_s": 191_734.0, "error_count": 0}

    def floor(rate: float, burn: float | None) -> dict:
        cpu = {"producer": 0.9, "tansu": 0.2, "box": 1.9, "other": 0.3, "wall_s": 5.0}
        return {"delivered_per_s": rate, "producer_cpu_us_per_delivered": 2.5,
                "cpu_cores": cpu if burn is None
                else {**cpu, "burn": burn}}

    data["floors"] = {"kafka_max": {"alone": floor(400_000.0, None),
                                    "beside_qos1_max_loadgen": floor(300_000.0, 0.6),
                                    "beside_qos0_max_loadgen": floor(50_000.0, 0.5)}}
    return data


def test_throughput_floors_explain_each_target_from_measured_numbers() -> None:
    md = report.markdown(_floors_data())
    assert "## Throughput floors (issue 15)" in md
    assert "| bare producer alone (delivered) | 400,000 | 0.90 | 0.20 | none | 0.30 " \
           "| 1.90 | 0.07x |" in md
    assert "| Lastmile qos1_max (acked after Kafka) | 29,559 | 1.00 | 0.20 | 0.60 | 0.20 " \
           "| 2.00 | - |" in md
    assert "| Mosquitto qos1_max (acked) | 67,319 |" in md and "| 0.44x |" in md
    # QoS 0: 0.4 x 191,734 = 76,694 needed, the floor beside the load generator is lower.
    assert "| qos0_max: >= 0.4x Mosquitto | 76,694 | 53,472 | 50,000 | **not met**: the " \
           "target is above the Kafka intake floor on this box" in md
    # QoS 1: 53,855 needed, the floor is far above: the CPU per message explains it.
    assert "| qos1_max: >= 0.8x Mosquitto | 53,855 | 29,559 | 300,000 | **not met** |" in md
    # 1.0 / 0.2 / 0.6 cores over 10 s for 300,000 messages: 33.3 + 6.7 + 20.0 = 60.0 µs,
    # 2 cores allow 33,333 msg/s; 2e6 / 53,855 - 26.7 = 10.5 µs for Lastmile.
    assert "beside the load generator's CPU, using 2.5 µs of CPU per record" in md
    assert "Lastmile 33.3 µs, tansu 6.7 µs, load generator 20.0 µs = 60.0 µs; at these " \
           "costs 2 cores allow at most 33,333 msg/s" in md
    assert "needs Lastmile at <= 10.5 µs per message with tansu and the load generator as " \
           "measured.\n" in md
    assert "| Mosquitto qos1_max (acked) | 67,319 | not measured | none |" in md


def test_throughput_target_met_and_not_measured() -> None:
    data = _floors_data()
    data["lastmile"]["results"]["qos1_max"]["acked_per_s"] = 60_000.0
    del data["mosquitto"]["results"]["qos0_max"]
    md = report.markdown(data)
    assert "| qos1_max: >= 0.8x Mosquitto | 53,855 | 60,000 | 300,000 | met |" in md
    # Lastmile within its CPU budget but short of the rate: the other load is named.
    data["lastmile"]["results"]["qos1_max"].update(acked_per_s=40_000.0, acked=1_000_000)
    md = report.markdown(data)
    assert "Lastmile 10.0 µs, tansu 2.0 µs, load generator 6.0 µs = 18.0 µs" in md
    assert "its 10.0 µs is within that, so the CPU the rest of the machine took accounts " \
           "for the shortfall in this run." in md
    assert "| qos0_max: >= 0.4x Mosquitto | not measured | 53,472 | 50,000 | not measured |" in md
    # Nothing measured at all still renders, saying so.
    md = report.markdown(_data(None))
    assert "| bare producer alone (delivered) | not measured |" in md


def test_full_plans_connect_rate_is_where_both_accept_every_client() -> None:
    """The full plan's `connect` scenario (a client count one Mosquitto process can
    hold) gives the connect-rate target, not the 40,000 idle run where Mosquitto
    resets half of its clients; the quick plan has no such scenario and no such rows."""
    def conn(rate: float, connected: int, requested: int) -> dict:
        return {"mode": "connect", "error_count": 0, "server_cpu_us_per_connect": 40,
                "loadgen_cpu_us_per_connect": 150,
                "connect": {"connected": connected, "requested": requested,
                            "connect_rate": rate, "connect_latency_ms": {"p99": 30.0}}}

    data = _data({"status": "measured", "results": {
        "idle": conn(5_000.0, 40_000, 40_000), "connect": conn(3_000.0, 19_000, 19_000)}})
    data["plan"] = report.plan_dict(make_plan(quick=False))
    data["quick"] = False
    data["mosquitto"]["results"].update(
        idle=conn(6_000.0, 19_993, 40_000), connect=conn(6_000.0, 19_000, 19_000))
    md = report.markdown(data)
    assert "| connect | connections accepted (higher is better) | 19,000 | 19,000 | 1.00x |" in md
    assert "| connect | server CPU µs per connect (lower is better) | 40 | 40 | 1.00x |" in md
    assert "| connect rate >= 1.0x Mosquitto | 0.50x | **not met** |" in md
    assert "Lastmile with 2 workers" in md
    quick = report.markdown(_data(None))
    assert "| connect |" not in quick
