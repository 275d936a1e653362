//! `GET /server/metrics` and `GET /metrics`: the engines' metrics and
//! per-route HTTP counters in the Prometheus text exposition format, and
//! the same engine figures under vLLM's names ([`crate::prom_vllm`]).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use kiln_engine::metrics::HistogramSnapshot;

use crate::registry::ModelState;
use crate::state::AppState;

/// Requests per (route, status) and their total time.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    by_route: Mutex<BTreeMap<(String, u16), (u64, f64)>>,
}

impl HttpMetrics {
    /// Counts one finished request.
    pub fn observe(&self, route: &str, status: u16, took: Duration) {
        if let Ok(mut m) = self.by_route.lock() {
            let e = m.entry((route.to_string(), status)).or_default();
            e.0 += 1;
            e.1 += took.as_secs_f64();
        }
    }

    /// `(route, status, count, seconds)` rows.
    pub fn rows(&self) -> Vec<(String, u16, u64, f64)> {
        self.by_route
            .lock()
            .map(|m| {
                m.iter()
                    .map(|((r, s), (n, t))| (r.clone(), *s, *n, *t))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Escapes a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn histogram(out: &mut String, name: &str, model: &str, h: &HistogramSnapshot) {
    for (le, count) in &h.buckets {
        let _ = writeln!(
            out,
            "{name}_bucket{{model=\"{model}\",le=\"{le}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{model=\"{model}\",le=\"+Inf\"}} {}",
        h.count
    );
    let _ = writeln!(out, "{name}_sum{{model=\"{model}\"}} {}", h.sum_seconds);
    let _ = writeln!(out, "{name}_count{{model=\"{model}\"}} {}", h.count);
}

/// The whole exposition.
pub fn render(st: &AppState) -> String {
    let mut out = String::new();
    let models = st.registry.all();
    let snaps: Vec<_> = models
        .iter()
        .map(|m| {
            let state = m.state();
            let snap = match &state {
                ModelState::Ready(e) => {
                    Some((e.metrics(), e.info().block_size, e.info().kv_blocks))
                }
                _ => None,
            };
            (label(&m.name), state.label(), snap)
        })
        .collect();
    let _ = writeln!(out, "# HELP kiln_model_ready Whether the model is loaded and serving (1), loading or failed (0).");
    let _ = writeln!(out, "# TYPE kiln_model_ready gauge");
    for (name, state, _) in &snaps {
        let _ = writeln!(
            out,
            "kiln_model_ready{{model=\"{name}\",state=\"{state}\"}} {}",
            u8::from(*state == "Healthy")
        );
    }
    type Getter = fn(&kiln_engine::MetricsSnapshot) -> u64;
    let series: [(&str, &str, &str, Getter); 12] = [
        (
            "kiln_queue_length",
            "gauge",
            "Requests waiting to start.",
            |m| m.waiting,
        ),
        (
            "kiln_running_sequences",
            "gauge",
            "Sequences in the running batch.",
            |m| m.running,
        ),
        ("kiln_kv_blocks_total", "gauge", "KV-cache blocks.", |m| {
            m.kv_blocks_total
        }),
        (
            "kiln_kv_blocks_used",
            "gauge",
            "KV-cache blocks held by sequences.",
            |m| m.kv_blocks_used,
        ),
        (
            "kiln_kv_blocks_free",
            "gauge",
            "KV-cache blocks free.",
            |m| m.kv_blocks_total - m.kv_blocks_used,
        ),
        (
            "kiln_prefix_cache_queried_tokens_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            |m| m.prefix_queried_tokens,
        ),
        (
            "kiln_prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens found in the prefix cache.",
            |m| m.prefix_hit_tokens,
        ),
        (
            "kiln_prompt_tokens_total",
            "counter",
            "Prompt tokens of admitted requests.",
            |m| m.prompt_tokens,
        ),
        (
            "kiln_generated_tokens_total",
            "counter",
            "Tokens generated.",
            |m| m.generated_tokens,
        ),
        (
            "kiln_requests_finished_total",
            "counter",
            "Requests finished for any reason.",
            |m| m.requests_finished,
        ),
        (
            "kiln_requests_failed_total",
            "counter",
            "Requests that failed in the engine.",
            |m| m.requests_failed,
        ),
        (
            "kiln_preemptions_total",
            "counter",
            "Sequences preempted to free KV blocks.",
            |m| m.preemptions,
        ),
    ];
    for (name, kind, help, get) in series {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (model, _, snap) in &snaps {
            if let Some((s, _, _)) = snap {
                let _ = writeln!(out, "{name}{{model=\"{model}\"}} {}", get(s));
            }
        }
    }
    for (name, help) in [
        (
            "kiln_time_to_first_token_seconds",
            "Time from submission to the first token.",
        ),
        (
            "kiln_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (model, _, snap) in &snaps {
            if let Some((s, _, _)) = snap {
                let h = if name.starts_with("kiln_time") {
                    &s.time_to_first_token
                } else {
                    &s.inter_token_latency
                };
                histogram(&mut out, name, model, h);
            }
        }
    }
    let figures: Vec<_> = snaps
        .iter()
        .filter_map(|(name, _, snap)| {
            snap.as_ref().map(
                |(metrics, block_size, num_blocks)| crate::prom_vllm::ModelFigures {
                    name,
                    metrics,
                    block_size: *block_size,
                    num_blocks: *num_blocks,
                },
            )
        })
        .collect();
    crate::prom_vllm::render(&mut out, &figures);
    let _ = writeln!(
        out,
        "# HELP kiln_http_requests_total HTTP requests by route and status."
    );
    let _ = writeln!(out, "# TYPE kiln_http_requests_total counter");
    let rows = st.http.rows();
    for (route, status, n, _) in &rows {
        let _ = writeln!(
            out,
            "kiln_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
            label(route)
        );
    }
    let _ = writeln!(
        out,
        "# HELP kiln_http_request_seconds_total Time spent on HTTP requests by route and status."
    );
    let _ = writeln!(out, "# TYPE kiln_http_request_seconds_total counter");
    for (route, status, _, t) in &rows {
        let _ = writeln!(
            out,
            "kiln_http_request_seconds_total{{route=\"{}\",status=\"{status}\"}} {t}",
            label(route)
        );
    }
    let _ = writeln!(
        out,
        "# HELP kiln_uptime_seconds Seconds since the server started."
    );
    let _ = writeln!(out, "# TYPE kiln_uptime_seconds gauge");
    let _ = writeln!(
        out,
        "kiln_uptime_seconds {}",
        st.started.elapsed().as_secs_f64()
    );
    out
}
