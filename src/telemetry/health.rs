//! Whether a process is alive and ready, and the HTTP endpoint that says so to an orchestrator
//! (`/healthz`, `/readyz`) and serves the metrics to Prometheus (`/metrics`).
//!
//! A process reports to its [`Health`] as it goes: the broker connection it holds, the database
//! it uses, the consumers it means to run and those that receive. Readiness is read from that,
//! and the database is asked, at the time of the probe.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::metrics;
use crate::broker::Broker;
use crate::store::Store;

/// How long a readiness probe waits for the database.
const DATABASE_PROBE: Duration = Duration::from_secs(2);

/// What a process reports about itself. Cheap to clone; clones share their state.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    broker: Mutex<Option<Arc<Broker>>>,
    store: Mutex<Option<Store>>,
    expected: AtomicUsize,
    running: AtomicUsize,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// The process now uses `broker` (a new connection, after a lost one).
    pub fn broker(&self, broker: &Arc<Broker>) {
        *self.inner.broker.lock().expect("not poisoned") = Some(broker.clone());
    }

    /// The process holds no broker connection.
    pub fn no_broker(&self) {
        *self.inner.broker.lock().expect("not poisoned") = None;
    }

    /// The process needs `store` to work: readiness asks it.
    pub fn database(&self, store: &Store) {
        *self.inner.store.lock().expect("not poisoned") = Some(store.clone());
    }

    /// The process is ready only while `count` consumers receive.
    pub fn expect_consumers(&self, count: usize) {
        self.inner.expected.store(count, Ordering::SeqCst);
    }

    /// A consumer receives from its queue until the guard is dropped.
    pub fn consuming(&self) -> Consuming {
        self.inner.running.fetch_add(1, Ordering::SeqCst);
        metrics::metrics().consumers_running.inc();
        Consuming { health: self.clone() }
    }

    /// `Ok` if ready; otherwise every reason it is not.
    pub async fn readiness(&self) -> Result<(), Vec<String>> {
        let mut reasons = Vec::new();
        let broker = self.inner.broker.lock().expect("not poisoned").clone();
        match broker {
            Some(broker) if broker.is_healthy() => {}
            Some(_) => reasons.push("the broker connection is closed".to_owned()),
            None => reasons.push("not connected to the broker".to_owned()),
        }
        let expected = self.inner.expected.load(Ordering::SeqCst);
        let running = self.inner.running.load(Ordering::SeqCst);
        if running < expected {
            reasons.push(format!("{running} of {expected} consumers running"));
        }
        let store = self.inner.store.lock().expect("not poisoned").clone();
        if let Some(store) = store {
            match tokio::time::timeout(DATABASE_PROBE, store.ping()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => reasons.push(format!("the database: {}", crate::error_chain(&err))),
                Err(_) => {
                    reasons.push(format!("the database did not answer within {} s", DATABASE_PROBE.as_secs()))
                }
            }
        }
        if reasons.is_empty() { Ok(()) } else { Err(reasons) }
    }

    /// What `/metrics` shows: the registry, with the pool's connections read now.
    fn metrics(&self) -> String {
        let store = self.inner.store.lock().expect("not poisoned").clone();
        if let Some(store) = store {
            let pool = store.pool_use();
            let gauges = &metrics::metrics().database_connections;
            gauges.get_or_create(&metrics::StateLabels { state: "in_use" }).set(pool.in_use as i64);
            gauges.get_or_create(&metrics::StateLabels { state: "idle" }).set(pool.idle as i64);
        }
        metrics::render()
    }
}

/// A consumer that receives, until dropped (see [`Health::consuming`]).
pub struct Consuming {
    health: Health,
}

impl Drop for Consuming {
    fn drop(&mut self) {
        self.health.inner.running.fetch_sub(1, Ordering::SeqCst);
        metrics::metrics().consumers_running.dec();
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` at `addr` until `shutdown`. Returns the address
/// bound (the port chosen, for port 0) once it listens: a port taken is an error at startup.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) -> Result<SocketAddr, std::io::Error> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(serve_readiness))
        .with_state(health);
    info!(address = %bound, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(err) = served {
            warn!(error = %err, "the metrics and health endpoint stopped");
        }
    });
    Ok(bound)
}

async fn serve_metrics(State(health): State<Health>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], health.metrics())
}

async fn serve_readiness(State(health): State<Health>) -> impl IntoResponse {
    match health.readiness().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reasons) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", reasons.join("; "))),
    }
}

/// What a health endpoint answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// Asks the health endpoint at `addr` whether the process is alive, or `ready`: what it
/// answered, or why it could not be asked.
pub async fn probe(addr: SocketAddr, ready: bool) -> Result<Answer, String> {
    let url = format!("http://{addr}/{}", if ready { "readyz" } else { "healthz" });
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .map_err(|err| format!("cannot make an HTTP client: {err}"))?;
    let unreachable = |err: reqwest::Error| format!("cannot reach {url}: {}", crate::error_chain(&err));
    let response = client.get(&url).send().await.map_err(unreachable)?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(unreachable)?;
    Ok(Answer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_a_broker_or_its_consumers_a_process_is_not_ready() {
        let health = Health::new();
        health.expect_consumers(2);
        let guard = health.consuming();
        let reasons = health.readiness().await.unwrap_err();
        assert_eq!(reasons, ["not connected to the broker", "1 of 2 consumers running"]);
        drop(guard);
        let reasons = health.readiness().await.unwrap_err();
        assert!(reasons.contains(&"0 of 2 consumers running".to_owned()), "{reasons:?}");
    }
}
