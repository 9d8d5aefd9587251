//! The fleet examples (monitor/examples/fleet/, FLEET.md) against what the
//! agent really writes and exports, without the shippers themselves: the
//! Vector and Fluent Bit configs, the ClickHouse table and the Prometheus
//! configs are parsed here and every field, column, label and metric name
//! they use is checked against real `--log` lines and the agent's metrics;
//! promtool (installed by `cargo xtask setup`) reads the Prometheus files.
//! No root, no kernel.
//!
//! tests/fixtures/fleet/sample.jsonl holds lines `egressmon run --log`
//! wrote, unedited, one or more of each event kind: the agent ran on a test
//! cgroup with `--android-root` (packages.list naming uid 10123),
//! `--identifiers` (an IMEI), `--geoip` (a CSV placing the test server in
//! CN), `--log-interval 1 --flow-idle 3`, while uid 1001 (radio) resolved a
//! name and POSTed the IMEI over HTTP and uid 10123 sent UDP twice under a
//! dry-run block rule (`egressmon block`), and the package list changed
//! under it. When the log format changes (a field
//! added to `FlowRecord`, a new event), `fixture_is_current_agent_output`
//! fails: capture new lines the same way (or take them from the
//! `observability` test's log), then update the examples until this file
//! passes.

use clap::CommandFactory;
use egressmon::identity::owners::Owner;
use egressmon::pipeline::flows::FlowRecord;
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

type Line = Map<String, Value>;

const EVENTS: [&str; 6] = [
    "flow_start",
    "flow_update",
    "flow_end",
    "alert",
    "block",
    "owner_change",
];
const DELTAS: [&str; 4] = [
    "delta_connects",
    "delta_udp_sends",
    "delta_tx_packets",
    "delta_tx_bytes",
];
const PREVIOUS: [&str; 4] = [
    "previous_owner",
    "previous_packages",
    "previous_origin",
    "previous_firmware",
];
/// Fields a Loki stream label may take: few values each, on every device.
/// Never a destination, port, uid, pid or host name (a stream each).
const LOW_CARDINALITY: [&str; 11] = [
    "job",
    "device",
    "event",
    "origin",
    "firmware",
    "owner",
    "proto",
    "family",
    "scope",
    "direction",
    "payload",
];

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn example(name: &str) -> PathBuf {
    crate_dir().join("examples/fleet").join(name)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(name: &str) -> Value {
    let path = example(name);
    serde_norway::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

fn sample() -> Vec<Line> {
    let path = crate_dir().join("tests/fixtures/fleet/sample.jsonl");
    let text = read(&path);
    assert!(text.ends_with('\n'), "whole lines only");
    text.lines()
        .map(|l| match serde_json::from_str(l) {
            Ok(Value::Object(line)) => line,
            other => panic!("not a JSON object ({other:?}): {l}"),
        })
        .collect()
}

/// Every field name any line of the log has.
fn log_fields(lines: &[Line]) -> BTreeSet<String> {
    lines.iter().flat_map(|l| l.keys().cloned()).collect()
}

fn set<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    names.into_iter().map(str::to_string).collect()
}

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().unwrap().keys().cloned().collect()
}

fn at<'a>(value: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(value, |v, k| {
        v.get(k)
            .unwrap_or_else(|| panic!("no {k} in {path:?} of {value}"))
    })
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected a list: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_else(|| panic!("not a string: {v}")))
        .collect()
}

/// The fields a line has beyond its flow (or owner) record, by event.
fn event_fields(line: &Line) -> BTreeSet<String> {
    let mut extra = set(["event", "time"]);
    match line["event"].as_str().unwrap() {
        // A flow moving again after its flow_end carries the deltas since.
        "flow_start" if line.contains_key("delta_tx_bytes") => extra.extend(set(DELTAS)),
        "flow_start" => {}
        "flow_update" => extra.extend(set(DELTAS)),
        "flow_end" => {
            extra.extend(set(DELTAS));
            extra.insert("reason".into());
        }
        "alert" => {
            extra.insert("rule".into());
        }
        "block" => extra.extend(set(["rule", "mode"])),
        "owner_change" => extra.extend(set(PREVIOUS)),
        other => panic!("unknown event {other}"),
    }
    extra
}

fn is_flow(line: &Line) -> bool {
    line["event"] != "owner_change"
}

fn flow_record(line: &Line) -> FlowRecord {
    serde_json::from_value(Value::Object(line.clone()))
        .unwrap_or_else(|e| panic!("not a flow record: {e}: {line:?}"))
}

#[test]
fn fixture_is_current_agent_output() {
    let lines = sample();
    let kinds: BTreeSet<String> = lines
        .iter()
        .map(|l| l["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, set(EVENTS), "one line or more of every event kind");
    for line in &lines {
        let time = line["time"].as_str().unwrap();
        humantime::parse_rfc3339(time).unwrap_or_else(|e| panic!("time {time}: {e}"));
        // What the agent's types serialize today, plus the event's own
        // fields, is exactly what the captured line has.
        let record = if is_flow(line) {
            serde_json::to_value(flow_record(line)).unwrap()
        } else {
            let owner: Owner = serde_json::from_value(Value::Object(line.clone())).unwrap();
            serde_json::to_value(owner).unwrap()
        };
        let mut expected = keys(&record);
        expected.extend(event_fields(line));
        let actual: BTreeSet<String> = line.keys().cloned().collect();
        assert_eq!(
            actual, expected,
            "sample.jsonl is not what the agent writes now: recapture it (see the top of \
             this file) and update examples/fleet: {line:?}"
        );
    }
    let end = lines.iter().find(|l| l["event"] == "flow_end").unwrap();
    assert!(["idle", "evicted"].contains(&end["reason"].as_str().unwrap()));
}

/// The remap program of vector.yaml, its kept field list, and the fields
/// it assigns.
struct Remap {
    source: String,
    kept: Vec<String>,
    added: BTreeSet<String>,
}

fn strip_comments(program: &str) -> String {
    program
        .lines()
        .map(|l| l.split('#').next().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

fn remap(vector: &Value) -> Remap {
    let transform = at(vector, &["transforms", "egressmon_parse"]);
    assert_eq!(transform["type"], "remap");
    let source = strip_comments(transform["source"].as_str().unwrap());
    // The one place the kept fields are listed: `fields = [ "a", "b", ... ]`.
    let start = source.find("fields = [").expect("a `fields = [...]` list") + "fields = [".len();
    let end = start + source[start..].find(']').unwrap();
    let kept: Vec<String> = source[start..end]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.strip_prefix('"')
                .and_then(|s| s.strip_suffix('"'))
                .unwrap_or_else(|| panic!("not a string literal in fields: {s}"))
                .to_string()
        })
        .collect();
    // Fields the program adds: lines `.name = ...`.
    let added = source
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix('.')?;
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let after = rest[name.len()..].trim_start();
            (!name.is_empty() && after.starts_with('=') && !after.starts_with("==")).then_some(name)
        })
        .collect();
    Remap {
        source,
        kept,
        added,
    }
}

/// Every event path (`.name`) a VRL program mentions.
fn paths(program: &str) -> BTreeSet<String> {
    let chars: Vec<char> = program.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut found = BTreeSet::new();
    for (i, &c) in chars.iter().enumerate() {
        if c != '.' || (i > 0 && (ident(chars[i - 1]) || chars[i - 1] == '"')) {
            continue;
        }
        let name: String = chars[i + 1..].iter().take_while(|c| ident(**c)).collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

/// `{{ name }}` in a Vector template, None for a literal.
fn template_field(template: &str) -> Option<String> {
    let inner = template.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    Some(inner.trim().to_string())
}

/// A Loki stream label must be one of the low-cardinality fields and must
/// be on every line (a template naming a missing field drops the event).
fn check_label(name: &str, field: &str, added: &BTreeSet<String>, lines: &[Line]) {
    assert!(
        LOW_CARDINALITY.contains(&name) && LOW_CARDINALITY.contains(&field),
        "Loki label {name} from {field}: not a low-cardinality field"
    );
    if added.contains(field) {
        return;
    }
    for line in lines {
        let value = line
            .get(field)
            .unwrap_or_else(|| panic!("label {name}: {field} missing from {line:?}"));
        assert!(
            value.is_string() || value.is_boolean(),
            "label {name}: {field} is {value}"
        );
    }
}

#[test]
fn vector_config_matches_the_log() {
    let lines = sample();
    let vector = yaml("vector.yaml");
    let Remap {
        source,
        kept,
        added,
    } = remap(&vector);
    let kept_set: BTreeSet<String> = kept.iter().cloned().collect();
    assert_eq!(kept.len(), kept_set.len(), "a field listed twice");
    assert_eq!(
        kept_set,
        log_fields(&lines),
        "vector.yaml keeps exactly the log's fields"
    );
    assert_eq!(added, set(["device", "timestamp"]));
    assert!(
        added.is_disjoint(&kept_set),
        "an added field hides a log field"
    );
    for path in paths(&source) {
        assert!(
            path == "message" || kept_set.contains(&path) || added.contains(&path),
            "the remap program reads .{path}, which no log line has"
        );
    }
    // The pipeline is wired: file -> remap -> both sinks.
    let source_cfg = at(&vector, &["sources", "egressmon_log"]);
    assert_eq!(source_cfg["type"], "file");
    assert_eq!(
        strings(&at(&vector, &["transforms", "egressmon_parse"])["inputs"]),
        ["egressmon_log"]
    );
    let sinks = at(&vector, &["sinks"]);
    assert_eq!(keys(sinks), set(["loki", "clickhouse"]));
    for sink in ["loki", "clickhouse"] {
        assert_eq!(strings(&sinks[sink]["inputs"]), ["egressmon_parse"]);
    }

    let loki = &sinks["loki"];
    assert_eq!(loki["type"], "loki");
    assert_eq!(loki["encoding"]["codec"], "json");
    let labels = loki["labels"].as_object().unwrap();
    assert!(labels.contains_key("device") && labels.contains_key("event"));
    for (name, template) in labels {
        match template_field(template.as_str().unwrap()) {
            Some(field) => check_label(name, &field, &added, &lines),
            None => assert!(!template.as_str().unwrap().contains("{{"), "{template}"),
        }
    }

    let clickhouse = &sinks["clickhouse"];
    assert_eq!(clickhouse["type"], "clickhouse");
    assert_eq!(clickhouse["format"], "json_each_row");
    assert_eq!(clickhouse["date_time_best_effort"], true);
    let except: BTreeSet<String> = strings(&clickhouse["encoding"]["except_fields"])
        .into_iter()
        .map(str::to_string)
        .collect();
    assert!(except.is_subset(&added), "only added fields are left out");
    let sent: BTreeSet<String> = kept_set.union(&added).cloned().collect();
    let sent: BTreeSet<String> = sent.difference(&except).cloned().collect();
    let columns: BTreeSet<String> = clickhouse_columns().into_iter().map(|c| c.0).collect();
    assert_eq!(
        sent, columns,
        "vector.yaml sends exactly the columns of clickhouse.sql"
    );
    let table = format!(
        "{}.{}",
        clickhouse["database"].as_str().unwrap(),
        clickhouse["table"].as_str().unwrap()
    );
    assert!(
        read(&example("clickhouse.sql")).contains(&format!("CREATE TABLE IF NOT EXISTS {table}")),
        "vector.yaml inserts into {table}"
    );
}

/// (name, type) of each column of the table in clickhouse.sql.
fn clickhouse_columns() -> Vec<(String, String)> {
    let sql: String = read(&example("clickhouse.sql"))
        .lines()
        .map(|l| l.split("--").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let create = sql.find("CREATE TABLE").expect("a CREATE TABLE");
    let open = create + sql[create..].find('(').unwrap();
    // The column list: up to the parenthesis that closes `open`.
    let (mut depth, mut quoted, mut parts, mut current) = (0, false, Vec::new(), String::new());
    for c in sql[open + 1..].chars() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth == 0 => break,
            ')' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    parts
        .iter()
        .map(|p| {
            let p = p.trim();
            let (name, ty) = p.split_once(char::is_whitespace).expect("name type");
            assert!(
                !ty.contains(" DEFAULT ") && !ty.contains(" MATERIALIZED "),
                "keep columns plain: {p}"
            );
            (name.trim_matches('`').to_string(), ty.trim().to_string())
        })
        .collect()
}

fn wrapped<'a>(ty: &'a str, name: &str) -> Option<&'a str> {
    ty.strip_prefix(name)?
        .strip_prefix('(')?
        .strip_suffix(')')
        .map(str::trim)
}

/// Whether ClickHouse reads `value` (from JSONEachRow, RFC 3339 times read
/// best effort) into a column of type `ty`.
fn check_type(ty: &str, value: &Value) -> Result<(), String> {
    if let Some(inner) = wrapped(ty, "Nullable") {
        return if value.is_null() {
            Ok(())
        } else {
            check_type(inner, value)
        };
    }
    if let Some(inner) = wrapped(ty, "LowCardinality") {
        return check_type(inner, value);
    }
    if let Some(inner) = wrapped(ty, "Array") {
        let items = value.as_array().ok_or(format!("{value} is not an array"))?;
        return items.iter().try_for_each(|v| check_type(inner, v));
    }
    if let Some(args) = wrapped(ty, "DateTime64") {
        let precision: usize = args.split(',').next().unwrap().trim().parse().unwrap();
        let text = value.as_str().ok_or(format!("{value} is not a time"))?;
        humantime::parse_rfc3339(text).map_err(|e| format!("{text}: {e}"))?;
        let fraction = text
            .split_once('.')
            .map_or(0, |(_, f)| f.trim_end_matches('Z').len());
        return if fraction <= precision {
            Ok(())
        } else {
            Err(format!(
                "{text} has more than {precision} fractional digits"
            ))
        };
    }
    let max = match ty {
        "String" => return value.is_string().then_some(()).ok_or(format!("{value}")),
        "Bool" => return value.is_boolean().then_some(()).ok_or(format!("{value}")),
        "UInt8" => u8::MAX as u64,
        "UInt16" => u16::MAX as u64,
        "UInt32" => u32::MAX as u64,
        "UInt64" => u64::MAX,
        other => {
            return Err(format!(
                "type {other} is not checked here: keep to plain types"
            ))
        }
    };
    match value.as_u64() {
        Some(n) if n <= max => Ok(()),
        _ => Err(format!("{value} is not a {ty}")),
    }
}

/// A flow line with every optional field given a value of its type, made
/// through the agent's own `FlowRecord`, so that the inner types of
/// Nullable columns are checked even where the sample has only nulls.
fn filled(line: &Line) -> Line {
    let mut r = flow_record(line);
    let seen = line["time"].as_str().map(str::to_string);
    r.comm.get_or_insert_with(|| "okhttp".into());
    r.pid.get_or_insert(4711);
    r.cgroup_id.get_or_insert(9187);
    r.cgroup
        .get_or_insert_with(|| "/system.slice/x.service".into());
    r.unit.get_or_insert_with(|| "x.service".into());
    r.exe.get_or_insert_with(|| "/system/bin/x".into());
    r.cmdline.get_or_insert_with(|| "x --y".into());
    r.selinux_context
        .get_or_insert_with(|| "u:r:radio:s0".into());
    r.partition.get_or_insert_with(|| "system".into());
    r.first_seen = r.first_seen.or_else(|| seen.clone());
    r.last_seen = r.last_seen.or(seen);
    r.host.get_or_insert_with(|| "example.org".into());
    r.host_source.get_or_insert_with(|| "sni".into());
    r.country.get_or_insert_with(|| "NL".into());
    r.asn.get_or_insert(64496);
    r.block_rule.get_or_insert_with(|| "radio-cn".into());
    r.block_mode
        .get_or_insert(egressmon::pipeline::rules::BlockMode::Enforce);
    let Value::Object(mut out) = serde_json::to_value(r).unwrap() else {
        unreachable!()
    };
    for key in event_fields(line) {
        out.insert(key.clone(), line[&key].clone());
    }
    if let Some((key, _)) = out.iter().find(|(_, v)| v.is_null()) {
        panic!("{key} is optional now: give it a value in filled() so its column type is checked");
    }
    out
}

#[test]
fn clickhouse_table_matches_the_log() {
    let lines = sample();
    let columns = clickhouse_columns();
    let names: BTreeSet<&str> = columns.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(names.len(), columns.len(), "a column declared twice");
    let fields = log_fields(&lines);
    let mut checked = lines.clone();
    checked.extend(lines.iter().filter(|l| is_flow(l)).map(filled));
    for (name, ty) in &columns {
        if name == "device" {
            // Added by the shipper: the device's name.
            check_type(ty, &Value::from("pixel-7-test-03")).unwrap();
            continue;
        }
        assert!(
            fields.contains(name),
            "column {name}: no log line has such a field"
        );
        for line in &checked {
            if let Some(value) = line.get(name) {
                check_type(ty, value).unwrap_or_else(|e| {
                    panic!("column {name} {ty}: {e} (in a {} line)", line["event"])
                });
            }
        }
    }
    for field in &fields {
        assert!(names.contains(field.as_str()), "no column for {field}");
    }
}

/// Whether `text` matches a strptime `format` as Fluent Bit reads it (the
/// conversions used here only: %Y %m %d %H %M %S, %L fractional seconds,
/// %z zone or Z).
fn strptime_matches(format: &str, text: &str) -> bool {
    let (mut f, mut t) = (format.chars().peekable(), text);
    let digits = |t: &str, min: usize, max: usize| -> Option<usize> {
        let n = t.chars().take_while(char::is_ascii_digit).count().min(max);
        (n >= min).then_some(n)
    };
    while let Some(c) = f.next() {
        let used = if c == '%' {
            match f.next() {
                Some('Y') => digits(t, 4, 4),
                Some('m' | 'd' | 'H' | 'M' | 'S') => digits(t, 2, 2),
                Some('L') => digits(t, 1, 9),
                Some('z') if t.starts_with('Z') => Some(1),
                Some('z') if t.starts_with(['+', '-']) => {
                    digits(&t[1..], 4, 4).map(|n| n + 1).or_else(|| {
                        let b = t.as_bytes();
                        (t.len() >= 6 && b[3] == b':').then_some(6)
                    })
                }
                _ => None,
            }
        } else {
            t.starts_with(c).then_some(c.len_utf8())
        };
        match used {
            Some(n) => t = &t[n..],
            None => return false,
        }
    }
    t.is_empty()
}

#[test]
fn fluent_bit_config_matches_the_log() {
    let lines = sample();
    let fields = log_fields(&lines);
    let fluent = yaml("fluent-bit.yaml");
    let parsers = fluent["parsers"].as_array().unwrap();
    let input = &at(&fluent, &["pipeline", "inputs"])[0];
    assert_eq!(input["name"], "tail");
    let parser = parsers
        .iter()
        .find(|p| p["name"] == input["parser"])
        .expect("the tail input's parser is defined");
    assert_eq!(parser["format"], "json");
    let time_key = parser["time_key"].as_str().unwrap();
    let format = parser["time_format"].as_str().unwrap();
    for line in &lines {
        let time = line[time_key].as_str().unwrap();
        assert!(
            strptime_matches(format, time),
            "{format} does not read {time}"
        );
    }
    assert!(!strptime_matches(format, "2026-12-03 10:35:13"));
    assert!(
        matches!(&parser["time_keep"], Value::Bool(true)) || parser["time_keep"] == "on",
        "the parser keeps `{time_key}` in the record"
    );
    // Same file as vector.yaml reads.
    let vector = yaml("vector.yaml");
    let include = strings(at(&vector, &["sources", "egressmon_log", "include"]))[0];
    assert_eq!(
        format!("{}*", input["path"].as_str().unwrap()),
        include,
        "fluent-bit.yaml and vector.yaml tail the same log"
    );

    let filters = at(&fluent, &["pipeline", "filters"]).as_array().unwrap();
    assert!(filters.iter().all(|f| f["match"] == input["tag"]));
    // First the allowlist, then the device: a key added before an
    // allowlist that does not name it would be dropped again.
    let allow: Vec<&str> = strings(&filters[0]["allowlist_key"]);
    assert_eq!(filters[0]["name"], "record_modifier");
    let allow_set = set(allow.iter().copied());
    assert_eq!(allow.len(), allow_set.len(), "a key listed twice");
    assert_eq!(
        allow_set, fields,
        "fluent-bit.yaml keeps exactly the log's fields"
    );
    assert_eq!(
        allow_set,
        set(remap(&vector).kept.iter().map(String::as_str)),
        "fluent-bit.yaml keeps what vector.yaml keeps"
    );
    assert_eq!(filters[1]["name"], "record_modifier");
    let added: BTreeSet<String> = strings(&filters[1]["record"])
        .iter()
        .map(|r| r.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(added, set(["device"]));
    assert!(added.is_disjoint(&fields), "an added key hides a log field");
    assert_eq!(filters.len(), 2);

    let output = &at(&fluent, &["pipeline", "outputs"])[0];
    assert_eq!(output["name"], "loki");
    assert_eq!(output["match"], input["tag"]);
    assert_eq!(output["line_format"], "json");
    let mut named = BTreeSet::new();
    for label in output["labels"].as_str().unwrap().split(',') {
        let (name, value) = label.trim().split_once('=').expect("name=value");
        named.insert(name.to_string());
        match value.strip_prefix('$') {
            Some(field) => check_label(name, field, &added, &lines),
            None => assert!(!value.contains('$'), "{label}"),
        }
    }
    assert!(named.contains("device") && named.contains("event"));
}

/// Metric names /metrics serves: the names registered in serve/metrics.rs.
fn exported_metrics() -> BTreeSet<String> {
    let text = read(&crate_dir().join("src/serve/metrics.rs"));
    let code = text.split("#[cfg(test)]").next().unwrap();
    // Each string literal that is a whole metric name: "egressmon_...".
    let names: BTreeSet<String> = code
        .split("\"egressmon_")
        .skip(1)
        .filter_map(|rest| {
            let (name, _) = rest.split_once('"')?;
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c == '_')
                .then(|| format!("egressmon_{name}"))
        })
        .collect();
    assert!(names.contains("egressmon_tx_bytes_total") && names.len() > 10);
    names
}

/// Metric names of the product contract: README's table of metrics.
fn contract_metrics() -> BTreeSet<String> {
    let readme = read(&crate_dir().join("../README.md"));
    let section = readme
        .split("\n## Prometheus metrics")
        .nth(1)
        .expect("README has a Prometheus metrics section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter(|l| l.starts_with('|'))
        .flat_map(|l| l.split('`').skip(1).step_by(2))
        .filter(|s| s.starts_with("egressmon_"))
        .map(str::to_string)
        .collect()
}

/// Every string in a YAML document (keys too).
fn all_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| all_strings(v, out)),
        Value::Object(map) => {
            for (k, v) in map {
                out.push(k.clone());
                all_strings(v, out);
            }
        }
        _ => {}
    }
}

fn recording_rules() -> BTreeSet<String> {
    let rules = yaml("rules.yml");
    let mut names = BTreeSet::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            assert!(rule["expr"].is_string(), "{rule}");
            names.insert(rule["record"].as_str().unwrap().to_string());
        }
    }
    names
}

const PROMETHEUS_FILES: [&str; 6] = [
    "prometheus.yml",
    "federate.yml",
    "prometheus-agent.yml",
    "rules.yml",
    "targets/hosts.yaml",
    "targets/phones-adb.yaml",
];

#[test]
fn prometheus_examples_name_only_exported_metrics() {
    let exported = exported_metrics();
    let contract = contract_metrics();
    let known: BTreeSet<&String> = exported.intersection(&contract).collect();
    let rules = recording_rules();
    let mut seen = 0;
    for file in PROMETHEUS_FILES {
        let mut texts = Vec::new();
        all_strings(&yaml(file), &mut texts);
        for text in &texts {
            let tokens = text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
            for token in tokens.filter(|t| t.contains("egressmon_")) {
                seen += 1;
                if token.contains(':') {
                    // A recording rule, level:metric:operations, of rules.yml.
                    let parts: Vec<&str> = token.split(':').collect();
                    let metric = parts.get(1).copied().unwrap_or_default();
                    assert!(
                        parts.len() == 3
                            && (known.contains(&metric.to_string())
                                || known.contains(&format!("{metric}_total"))),
                        "{file}: {token} is not level:metric:operations of an exported metric"
                    );
                    assert!(rules.contains(token), "{file}: {token} is not in rules.yml");
                } else {
                    // `egressmon_` alone is a prefix in a regex.
                    assert!(
                        token == "egressmon_" || known.contains(&token.to_string()),
                        "{file}: {token} is not a metric egressmon exports (serve/metrics.rs) \
                         and README lists"
                    );
                }
            }
        }
    }
    assert!(seen > 10, "the examples name metrics");
}

#[test]
fn prometheus_examples_are_configs_prometheus_reads() {
    let top = set([
        "global",
        "rule_files",
        "scrape_configs",
        "remote_write",
        "remote_read",
        "alerting",
        "storage",
    ]);
    let mut jobs = BTreeSet::new();
    for file in ["prometheus.yml", "federate.yml", "prometheus-agent.yml"] {
        let config = yaml(file);
        assert!(keys(&config).is_subset(&top), "{file}: {:?}", keys(&config));
        for scrape in config["scrape_configs"].as_array().unwrap() {
            let job = scrape["job_name"].as_str().unwrap();
            assert!(
                jobs.insert(format!("{file}/{job}")),
                "{file}: job {job} twice"
            );
            for sd in scrape["file_sd_configs"].as_array().into_iter().flatten() {
                for target_file in strings(&sd["files"]) {
                    let targets = yaml(target_file);
                    for group in targets.as_array().unwrap() {
                        assert!(!strings(&group["targets"]).is_empty());
                        assert!(
                            group["labels"]["device"].is_string(),
                            "{target_file}: every group names its device"
                        );
                    }
                }
            }
        }
        for rules in config["rule_files"].as_array().into_iter().flatten() {
            assert!(example(rules.as_str().unwrap()).exists(), "{file}: {rules}");
        }
    }
    // Agent mode scrapes the agent where it listens by default.
    let agent = yaml("prometheus-agent.yml");
    assert!(agent["remote_write"][0]["url"].is_string());
    assert!(agent["global"]["external_labels"]["device"].is_string());
    let target = &at(&agent, &["scrape_configs"])[0]["static_configs"][0]["targets"][0];
    assert_eq!(target.as_str(), Some(default_listen().as_str()));
    // Federation keeps the sites' labels.
    let federate = &yaml("federate.yml")["scrape_configs"][0];
    assert_eq!(federate["metrics_path"], "/federate");
    assert_eq!(federate["honor_labels"], true);
    assert!(!strings(&federate["params"]["match[]"]).is_empty());
}

/// Prometheus's own checker reads the configs and rules as Prometheus
/// would (syntax only: the secret files they name are not here).
#[test]
fn prometheus_configs_pass_promtool() {
    let checks: [&[&str]; 4] = [
        &["check", "config", "--syntax-only", "prometheus.yml"],
        &["check", "config", "--syntax-only", "federate.yml"],
        &[
            "check",
            "config",
            "--syntax-only",
            "--agent",
            "prometheus-agent.yml",
        ],
        &["check", "rules", "rules.yml"],
    ];
    for args in checks {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(example(""))
            .output()
            .expect("promtool (installed by cargo xtask setup)");
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn web_config_example_has_the_agents_layout() {
    // The fields serve/web_config.rs accepts (it refuses any other).
    let web = yaml("egressmon-web.yml");
    assert_eq!(keys(&web), set(["tls_server_config", "basic_auth_users"]));
    let tls = keys(&web["tls_server_config"]);
    assert!(tls.is_subset(&set([
        "cert_file",
        "key_file",
        "client_auth_type",
        "client_ca_file",
        "min_version",
    ])));
    assert!(tls.contains("cert_file") && tls.contains("key_file"));
    assert!(web["basic_auth_users"].as_object().unwrap().len() == 1);
}

fn run_command() -> clap::Command {
    egressmon::cli::Cli::command()
        .find_subcommand("run")
        .expect("egressmon run")
        .clone()
}

fn default_listen() -> String {
    let run = run_command();
    let listen = run
        .get_arguments()
        .find(|a| a.get_long() == Some("listen"))
        .expect("run --listen");
    listen.get_default_values()[0]
        .to_string_lossy()
        .into_owned()
}

#[test]
fn egressmon_commands_in_the_docs_are_real() {
    assert_eq!(default_listen(), "127.0.0.1:9864");
    let run = run_command();
    let flags: BTreeSet<&str> = run.get_arguments().filter_map(|a| a.get_long()).collect();
    let mut docs = vec![crate_dir().join("../FLEET.md")];
    docs.extend(
        [
            "vector.yaml",
            "fluent-bit.yaml",
            "egressmon-web.yml",
            "clickhouse.sql",
        ]
        .iter()
        .chain(PROMETHEUS_FILES.iter())
        .map(|f| example(f)),
    );
    let mut used = 0;
    for doc in &docs {
        let text = read(doc);
        // A command runs to the end of its line (a comment in a config), in
        // Markdown to its closing backtick (it may wrap).
        let commands: Vec<&str> = if doc.extension().is_some_and(|e| e == "md") {
            text.split("`egressmon run").skip(1).collect()
        } else {
            text.lines()
                .filter_map(|l| Some(l.split_once("egressmon run")?.1))
                .collect()
        };
        for command in commands {
            let command = command.split('`').next().unwrap();
            for word in command.split_whitespace() {
                let Some(flag) = word.strip_prefix("--") else {
                    continue;
                };
                let flag = flag.split('=').next().unwrap();
                let flag = flag.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
                assert!(
                    flags.contains(flag),
                    "{}: `egressmon run --{flag}` is not a flag of run",
                    doc.display()
                );
                used += 1;
            }
        }
    }
    assert!(used >= 4, "the docs show how to run the agent");
}
