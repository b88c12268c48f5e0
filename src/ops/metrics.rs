//! The worker's Prometheus metrics: one [`Metrics`] per worker, with its own registry.
//!
//! prometheus-client rather than the `metrics` facade: its registry is a value the pipeline
//! owns, not a process-wide recorder, so several workers in one process (the tests, the demo)
//! keep separate counts, and the types say what each metric is. It writes the OpenMetrics text
//! format, which Prometheus negotiates and parses.
//!
//! Most metrics are updated where things happen. Those that describe state kept elsewhere
//! (circuits, parked jobs, rollouts) are refreshed from it at each scrape by [`super::server`],
//! so they cannot drift from it.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::rollout::{Snapshot, State};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `modify` or `describe`.
    pub call: String,
    /// `2xx` … `5xx`, or `none` when no HTTP answer came (timeout, connect error).
    pub status_class: String,
    pub region: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabels {
    /// `credentials` or `region:<id>`.
    pub scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutLabels {
    pub rollout: String,
}

/// Every metric of one worker.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub deliveries: Counter,
    pub jobs_finished: Family<OutcomeLabels, Counter>,
    pub jobs_replayed: Counter,
    pub api_calls: Family<CallLabels, Counter>,
    pub retries: Counter,
    pub throttle_pauses: Counter,
    pub circuit_open: Family<ScopeLabels, Gauge>,
    pub rate_limit_wait: Histogram,
    pub job_duration: Histogram,
    pub store_commit: Histogram,
    pub publish_confirm: Histogram,
    pub in_flight: Gauge,
    pub parked: Gauge,
    pub reconnects: Counter,
    pub broker_connected: Gauge,
    credential_fetches: Counter,
    rollouts: RolloutGauges,
    /// Scopes whose circuit was ever open, so a closed one reads 0 rather than vanishing.
    circuit_scopes: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Broker sessions started, the first included.
    sessions: std::sync::atomic::AtomicU64,
}

/// The per-rollout gauges: the only metrics with a `rollout` label.
#[derive(Debug, Default)]
struct RolloutGauges {
    progress: Family<RolloutLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    expected: Family<RolloutLabels, Gauge>,
    finished: Family<RolloutLabels, Gauge>,
    failures: Family<RolloutLabels, Gauge>,
    budget: Family<RolloutLabels, Gauge>,
}

/// Latency buckets (seconds) from a millisecond to half an hour: store commits and publishes
/// sit at the low end, jobs that waited out a circuit or a 429 pause at the high end.
fn seconds_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        300.0, 1800.0,
    ]
    .into_iter()
}

fn histogram() -> Histogram {
    Histogram::new(seconds_buckets())
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut metrics = Metrics {
            registry: Registry::default(),
            deliveries: Counter::default(),
            jobs_finished: Family::default(),
            jobs_replayed: Counter::default(),
            api_calls: Family::default(),
            retries: Counter::default(),
            throttle_pauses: Counter::default(),
            circuit_open: Family::default(),
            rate_limit_wait: histogram(),
            job_duration: histogram(),
            store_commit: histogram(),
            publish_confirm: histogram(),
            in_flight: Gauge::default(),
            parked: Gauge::default(),
            reconnects: Counter::default(),
            broker_connected: Gauge::default(),
            credential_fetches: Counter::default(),
            rollouts: RolloutGauges::default(),
            circuit_scopes: Default::default(),
            sessions: Default::default(),
        };
        metrics.register();
        metrics
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        let info = Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]);
        r.register("keyturn_build", "keyturn's version", info);
        r.register(
            "keyturn_deliveries_received",
            "Job deliveries taken from the jobs queue",
            self.deliveries.clone(),
        );
        r.register(
            "keyturn_jobs_finished",
            "Jobs given a final record, by outcome (replays not counted)",
            self.jobs_finished.clone(),
        );
        r.register(
            "keyturn_jobs_replayed",
            "Duplicate deliveries answered with the stored result",
            self.jobs_replayed.clone(),
        );
        r.register(
            "keyturn_api_calls",
            "API attempts, by call, HTTP status class and region",
            self.api_calls.clone(),
        );
        r.register(
            "keyturn_api_retries",
            "API attempts repeated after a retryable error",
            self.retries.clone(),
        );
        r.register(
            "keyturn_throttle_pauses",
            "Pauses of a region and project after a 429",
            self.throttle_pauses.clone(),
        );
        r.register(
            "keyturn_circuit_open",
            "1 while the circuit of a scope is open, 0 once closed",
            self.circuit_open.clone(),
        );
        let seconds = [
            (
                "keyturn_rate_limit_wait_seconds",
                "Time a call waited for rate-limit tokens",
                &self.rate_limit_wait,
            ),
            (
                "keyturn_job_duration_seconds",
                "From delivery until its result is confirmed (final records and replays)",
                &self.job_duration,
            ),
            (
                "keyturn_store_commit_seconds",
                "Commit of a job's final record to the store",
                &self.store_commit,
            ),
            (
                "keyturn_publish_confirm_seconds",
                "Publish of a result event until the broker confirmed it",
                &self.publish_confirm,
            ),
        ];
        // The unit is in the name, without a UNIT line: strict parsers refuse one on histograms.
        for (name, help, histogram) in seconds {
            r.register(name, help, histogram.clone());
        }
        r.register(
            "keyturn_jobs_in_flight",
            "Deliveries being worked on",
            self.in_flight.clone(),
        );
        r.register(
            "keyturn_jobs_parked",
            "Jobs parked in the store (all workers of the store)",
            self.parked.clone(),
        );
        r.register(
            "keyturn_broker_reconnects",
            "Broker sessions started after the first (each after a lost one)",
            self.reconnects.clone(),
        );
        r.register(
            "keyturn_credential_fetches",
            "Credentials fetched from IAM or the metadata service",
            self.credential_fetches.clone(),
        );
        r.register(
            "keyturn_broker_connected",
            "1 while the broker session is up",
            self.broker_connected.clone(),
        );
        let rollouts = &self.rollouts;
        r.register(
            "keyturn_rollout_progress_ratio",
            "Share of a rollout's expected jobs with a final outcome",
            rollouts.progress.clone(),
        );
        r.register(
            "keyturn_rollout_expected_jobs",
            "Jobs a rollout declared",
            rollouts.expected.clone(),
        );
        r.register(
            "keyturn_rollout_finished_jobs",
            "Jobs of a rollout with a final outcome",
            rollouts.finished.clone(),
        );
        r.register(
            "keyturn_rollout_failures",
            "Failed and rejected jobs of a rollout: its failure budget used",
            rollouts.failures.clone(),
        );
        r.register(
            "keyturn_rollout_failure_budget",
            "Failures a rollout allows before it halts",
            rollouts.budget.clone(),
        );
    }

    /// The registry in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    pub fn job_finished(&self, outcome: &str) {
        self.jobs_finished
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// One API attempt: `http_status` is `None` when no answer came.
    pub fn api_call(&self, call: &str, http_status: Option<u16>, region: &str) {
        let status_class = match http_status {
            Some(status) => format!("{}xx", status / 100),
            None => "none".to_owned(),
        };
        self.api_calls
            .get_or_create(&CallLabels {
                call: call.to_owned(),
                status_class,
                region: region.to_owned(),
            })
            .inc();
    }

    /// Sets `keyturn_circuit_open` from the open circuits (scope key, cause): 1 for each open
    /// scope, 0 for every scope seen open before.
    pub fn circuits(&self, open: &[(String, String)]) {
        let mut seen = self.circuit_scopes.lock().expect("metrics lock");
        seen.extend(open.iter().map(|(scope, _)| scope.clone()));
        for scope in seen.iter() {
            let is_open = open.iter().any(|(key, _)| key == scope);
            self.circuit_open
                .get_or_create(&ScopeLabels {
                    scope: scope.clone(),
                })
                .set(i64::from(is_open));
        }
    }

    /// A broker session started: connected, and a reconnect unless it is the first.
    pub fn session_started(&self) {
        if self
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            self.reconnects.inc();
        }
        self.broker_connected.set(1);
    }

    /// Brings the fetch counter up to `fetched`, the client's own count.
    pub fn credentials_fetched(&self, fetched: u64) {
        let counted = self.credential_fetches.get();
        if fetched > counted {
            self.credential_fetches.inc_by(fetched - counted);
        }
    }

    /// Sets the rollout gauges from the store's snapshots; a rollout that ended (completed or
    /// cancelled) loses its gauges.
    pub fn rollouts(&self, snapshots: &[Snapshot]) {
        let gauges = &self.rollouts;
        for snapshot in snapshots {
            let labels = RolloutLabels {
                rollout: snapshot.rollout_id.clone(),
            };
            if matches!(snapshot.state, State::Completed | State::Cancelled) {
                gauges.progress.remove(&labels);
                gauges.expected.remove(&labels);
                gauges.finished.remove(&labels);
                gauges.failures.remove(&labels);
                gauges.budget.remove(&labels);
                continue;
            }
            let finished = snapshot.counts.finished();
            gauges.finished.get_or_create(&labels).set(gauge(finished));
            gauges
                .failures
                .get_or_create(&labels)
                .set(gauge(snapshot.budget.used));
            if let Some(expected) = snapshot.expected_jobs.filter(|n| *n > 0) {
                gauges.expected.get_or_create(&labels).set(gauge(expected));
                let ratio = (finished as f64 / expected as f64).min(1.0);
                gauges.progress.get_or_create(&labels).set(ratio);
            }
            if let Some(allowed) = snapshot.budget.allowed {
                gauges.budget.get_or_create(&labels).set(gauge(allowed));
            }
        }
    }
}

fn gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Observes `elapsed` in seconds.
pub fn observe(histogram: &Histogram, elapsed: Duration) {
    histogram.observe(elapsed.as_secs_f64());
}

/// Counts one job in flight for as long as it lives.
pub struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    pub fn enter(gauge: &'a Gauge) -> InFlight<'a> {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let metrics = Metrics::new();
        metrics.job_finished("succeeded");
        metrics.api_call("modify", Some(503), "cn-north-4");
        metrics.api_call("describe", None, "cn-north-4");
        observe(&metrics.job_duration, Duration::from_millis(20));
        let text = metrics.render();
        for line in [
            "keyturn_build_info{version=\"",
            "keyturn_jobs_finished_total{outcome=\"succeeded\"} 1",
            "keyturn_api_calls_total{call=\"modify\",status_class=\"5xx\",region=\"cn-north-4\"} 1",
            "keyturn_api_calls_total{call=\"describe\",status_class=\"none\",region=\"cn-north-4\"} 1",
            "keyturn_job_duration_seconds_count 1",
            "# TYPE keyturn_store_commit_seconds histogram",
            "keyturn_jobs_in_flight 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            assert!(line.starts_with("keyturn_"), "{line}");
        }
    }

    #[test]
    fn a_job_in_flight_is_counted_until_it_ends() {
        let metrics = Metrics::new();
        let guard = InFlight::enter(&metrics.in_flight);
        assert_eq!(metrics.in_flight.get(), 1);
        drop(guard);
        assert_eq!(metrics.in_flight.get(), 0);
    }
}
