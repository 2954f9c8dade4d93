//! The network health report, logged every `report_interval` (seed 002 printed one every 300 s): live
//! clients by version, the unreachable pairs, the worst latencies.

use std::sync::Arc;
use std::time::Duration;

use crate::State;

/// Most unreachable pairs one report lists.
const LISTED: usize = 20;

/// Logs the report every `interval` until the control plane stops.
pub async fn run(state: Arc<State>, interval: Duration) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = state.stop.cancelled() => return,
        }
        let matrix = super::seed::matrix_view(&state).await;
        let summary = &matrix["summary"];
        let unreachable: Vec<String> = summary["unreachable"]
            .as_array()
            .into_iter()
            .flatten()
            .take(LISTED)
            .map(|pair| {
                format!("{} -> {}", pair["from"].as_str().unwrap_or("?"), pair["to"].as_str().unwrap_or("?"))
            })
            .collect();
        let worst: Vec<String> = summary["worstLatencies"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|pair| {
                format!(
                    "{} -> {} {:.1} ms",
                    pair["from"].as_str().unwrap_or("?"),
                    pair["to"].as_str().unwrap_or("?"),
                    pair["latencyMs"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        tracing::info!(
            clients = summary["clients"].as_u64().unwrap_or(0),
            versions = %summary["versions"],
            pairs = summary["pairs"].as_u64().unwrap_or(0),
            unreachable_pairs = summary["unreachablePairs"].as_u64().unwrap_or(0),
            unreachable = ?unreachable,
            worst_latencies = ?worst,
            "network health report"
        );
    }
}
