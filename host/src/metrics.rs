//! The server's Prometheus metrics (`GET /metrics`): counters, gauges and histograms in
//! one process-wide registry, rendered in Prometheus's text format.
//!
//! - `conductor_http_requests_total{method,status}`: API requests answered;
//! - `conductor_jobs_waiting{kind}`, `conductor_jobs_running{kind}`: builds, pushes and
//!   deletes waiting for a worker, and running, now;
//! - `conductor_jobs_finished_total{kind,outcome}`: jobs that ended (`ok`, `failed`);
//! - `conductor_job_duration_seconds{kind}`: how long finished jobs took, retries included;
//! - `conductor_plugin_calls_total{target,call}` and
//!   `conductor_plugin_call_failures_total{target,call}`: plugin calls and those that
//!   failed (a cancel or a shutdown is not a failure);
//! - `conductor_login_failures_total`: wrong passwords (or unknown users) checked;
//!   `conductor_login_checks_running`: password checks running now.
//!
//! A metric is a handful of map updates under one lock: far below the cost of the work
//! it counts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};

/// Upper bounds of the duration histogram's buckets, in seconds: jobs take from a
/// fraction of a second (mock) to an hour (a large upload).
const BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0];

const HELP: &[(&str, &str, &str)] = &[
    (
        "conductor_http_requests_total",
        "counter",
        "API requests answered, by method and status code.",
    ),
    (
        "conductor_jobs_waiting",
        "gauge",
        "Builds, pushes and provider-side deletes waiting for a worker now.",
    ),
    (
        "conductor_jobs_running",
        "gauge",
        "Builds, pushes and provider-side deletes running now.",
    ),
    (
        "conductor_jobs_finished_total",
        "counter",
        "Jobs that ended, by kind and outcome.",
    ),
    (
        "conductor_job_duration_seconds",
        "histogram",
        "Time from a job's first start to its end, retries included.",
    ),
    (
        "conductor_plugin_calls_total",
        "counter",
        "Plugin calls, by target and call.",
    ),
    (
        "conductor_plugin_call_failures_total",
        "counter",
        "Plugin calls that failed, by target and call.",
    ),
    (
        "conductor_login_failures_total",
        "counter",
        "Wrong passwords and unknown users checked.",
    ),
    (
        "conductor_login_checks_running",
        "gauge",
        "Password checks running now.",
    ),
];

#[derive(Default)]
struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Registry {
    /// name → rendered labels → value.
    values: BTreeMap<&'static str, BTreeMap<String, f64>>,
    histograms: BTreeMap<&'static str, BTreeMap<String, Histogram>>,
}

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| Mutex::new(Registry::default()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `{a="x",b="y"}`, values escaped as the text format wants. One allocation: it runs
/// for every request.
fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let mut out = String::with_capacity(
        2 + labels
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>(),
    );
    out.push('{');
    for (n, (key, value)) in labels.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push_str(key);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// Adds one to a counter.
pub fn inc(name: &'static str, labels: &[(&str, &str)]) {
    add(name, labels, 1.0);
}

/// Adds `delta` to a counter or gauge.
pub fn add(name: &'static str, labels: &[(&str, &str)], delta: f64) {
    *registry()
        .values
        .entry(name)
        .or_default()
        .entry(render_labels(labels))
        .or_default() += delta;
}

/// Records one observation in a histogram.
pub fn observe(name: &'static str, labels: &[(&str, &str)], value: f64) {
    let mut registry = registry();
    let histogram = registry
        .histograms
        .entry(name)
        .or_default()
        .entry(render_labels(labels))
        .or_insert_with(|| Histogram {
            buckets: vec![0; BUCKETS.len()],
            ..Histogram::default()
        });
    for (bucket, bound) in histogram.buckets.iter_mut().zip(BUCKETS) {
        if value <= *bound {
            *bucket += 1;
        }
    }
    histogram.count += 1;
    histogram.sum += value;
}

/// Everything, in Prometheus's text exposition format.
pub fn render() -> String {
    let registry = registry();
    let mut out = String::new();
    for (name, kind, help) in HELP {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        if let Some(series) = registry.values.get(name) {
            for (labels, value) in series {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        }
        if let Some(series) = registry.histograms.get(name) {
            for (labels, histogram) in series {
                // The bucket label goes with the others: `{kind="build",le="1"}`.
                let with = |le: &str| {
                    if labels.is_empty() {
                        format!("{{le=\"{le}\"}}")
                    } else {
                        format!("{},le=\"{le}\"}}", &labels[..labels.len() - 1])
                    }
                };
                for (count, bound) in histogram.buckets.iter().zip(BUCKETS) {
                    let _ = writeln!(out, "{name}_bucket{} {count}", with(&bound.to_string()));
                }
                let _ = writeln!(out, "{name}_bucket{} {}", with("+Inf"), histogram.count);
                let _ = writeln!(out, "{name}_sum{labels} {}", histogram.sum);
                let _ = writeln!(out, "{name}_count{labels} {}", histogram.count);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_render_in_the_text_format() {
        inc(
            "conductor_plugin_calls_total",
            &[("target", "unit\"test"), ("call", "push")],
        );
        observe("conductor_job_duration_seconds", &[("kind", "unit")], 2.0);
        let text = render();
        assert!(
            text.contains("conductor_plugin_calls_total{target=\"unit\\\"test\",call=\"push\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("conductor_job_duration_seconds_bucket{kind=\"unit\",le=\"1\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("conductor_job_duration_seconds_bucket{kind=\"unit\",le=\"5\"} 1"),
            "{text}"
        );
        assert!(text.contains("conductor_job_duration_seconds_count{kind=\"unit\"} 1"));
        assert!(text.contains("# TYPE conductor_jobs_running gauge"));
    }
}
