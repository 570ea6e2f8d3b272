//! dist/grafana/lobby.json queries only metrics Lobby exports: the names
//! come from what `lobby::metrics::render` writes, not from a list kept
//! here.
use std::collections::BTreeSet;

use serde_json::Value;

/// Every series name the endpoint can show: each family's name, and a
/// histogram's `_bucket`, `_sum` and `_count` series.
fn exported() -> BTreeSet<String> {
    let text = lobby::metrics::render(lobby::metrics::Snapshot::default());
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(family) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = family.split_once(' ').expect("# TYPE NAME KIND");
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        } else {
            names.insert(name.to_owned());
        }
    }
    names
}

/// The PromQL of every panel target and template variable.
fn queries(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match value {
                    Value::String(query) if key == "expr" || key == "query" => {
                        found.push(query.clone());
                    }
                    _ => queries(value, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| queries(item, found)),
        _ => {}
    }
}

/// The `lobby_*` identifiers in a PromQL expression.
fn metric_names(query: &str) -> Vec<&str> {
    query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("lobby_"))
        .collect()
}

#[test]
fn every_dashboard_query_names_an_exported_metric() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/grafana/lobby.json");
    let text = std::fs::read_to_string(path).expect("reading the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut found = Vec::new();
    queries(&dashboard, &mut found);
    let exported = exported();
    assert!(
        exported.contains("lobby_upstream_up"),
        "no families in the rendered metrics: {exported:?}"
    );
    let mut used = BTreeSet::new();
    for query in &found {
        for name in metric_names(query) {
            assert!(
                exported.contains(name),
                "{name} (in `{query}`) is not a metric Lobby exports: {exported:?}"
            );
            used.insert(name);
        }
    }
    // Each panel's metrics were found: the walk did not miss the targets.
    for name in [
        "lobby_upstream_connections_total",
        "lobby_upstream_bytes_total",
        "lobby_config_reloads_total",
        "lobby_nft_apply_duration_seconds_bucket",
        "lobby_target_denied_packets_total",
    ] {
        assert!(used.contains(name), "no query uses {name}");
    }
}

#[test]
fn metric_names_are_read_from_promql() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.9, sum by (le) (rate(lobby_nft_apply_duration_seconds_bucket{target=~"$target"}[$__rate_interval])))"#
        ),
        ["lobby_nft_apply_duration_seconds_bucket"]
    );
}
