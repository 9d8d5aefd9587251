-- One row per egressmon --log line, as vector.yaml inserts them
-- (JSONEachRow, date_time_input_format=best_effort). Columns are the log's
-- fields with their JSON types, plus `device` (added by the shipper).
--
-- Each event kind carries a subset of the fields: a field a line lacks
-- takes its column's default (input_format_defaults_for_omitted_fields):
-- delta_* 0 except on flow_update/flow_end (and a flow_start after an end),
-- reason '' except on flow_end, rule '' except on alert and block, mode ''
-- except on block, previous_* empty
-- except on owner_change, whose rows leave the flow columns at their defaults.
--
-- monitor/tests/fleet.rs checks every column against real log lines.

CREATE DATABASE IF NOT EXISTS egressmon;

CREATE TABLE IF NOT EXISTS egressmon.events
(
    device            LowCardinality(String),
    event             LowCardinality(String),
    time              DateTime64(3, 'UTC'),
    uid               UInt32,
    user              UInt32,
    app_id            UInt32,
    owner             LowCardinality(String),
    packages          Array(String),
    origin            LowCardinality(String),
    firmware          Bool,
    comm              Nullable(String),
    pid               Nullable(UInt32),
    cgroup_id         Nullable(UInt64),
    cgroup            Nullable(String),
    unit              Nullable(String),
    exe               Nullable(String),
    cmdline           Nullable(String),
    selinux_context   Nullable(String),
    partition         LowCardinality(Nullable(String)),
    proto             LowCardinality(String),
    family            LowCardinality(String),
    dst               String,
    port              UInt16,
    connects          UInt64,
    udp_sends         UInt64,
    tx_packets        UInt64,
    tx_bytes          UInt64,
    first_seen        Nullable(DateTime64(3, 'UTC')),
    last_seen         Nullable(DateTime64(3, 'UTC')),
    host              Nullable(String),
    host_source       LowCardinality(Nullable(String)),
    country           LowCardinality(Nullable(String)),
    asn               Nullable(UInt32),
    payload           LowCardinality(String),
    leaks             Array(String),
    direction         LowCardinality(String),
    scope             LowCardinality(String),
    blocked           UInt64,
    block_rule        LowCardinality(Nullable(String)),
    block_mode        LowCardinality(Nullable(String)),
    delta_connects    UInt64,
    delta_udp_sends   UInt64,
    delta_tx_packets  UInt64,
    delta_tx_bytes    UInt64,
    reason            LowCardinality(String),
    rule              LowCardinality(String),
    mode              LowCardinality(String),
    previous_owner    String,
    previous_packages Array(String),
    previous_origin   LowCardinality(String),
    previous_firmware Bool
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (device, event, uid, time)
TTL toDateTime(time) + INTERVAL 400 DAY;

-- Example: where firmware sent data, per device, over the last week
-- (tx_bytes is the flow's running total while the kernel keeps the flow).
-- SELECT device, owner, proto, dst, port, any(host) AS host,
--        any(country) AS country, max(tx_bytes) AS bytes
-- FROM egressmon.events
-- WHERE firmware AND event IN ('flow_start', 'flow_update', 'flow_end')
--   AND time > now() - INTERVAL 7 DAY
-- GROUP BY device, owner, proto, dst, port ORDER BY bytes DESC;
