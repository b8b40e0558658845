//! What an operator watches: a worker and an agent started with `--metrics-addr` serve
//! `/metrics`, `/healthz` and `/readyz`; the counters move as a request runs, and readiness
//! follows the database.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use crate::helpers::*;

/// A `switchyard` process of the app's namespace, serving its metrics on a port of its choosing.
struct Served {
    child: Child,
    addr: SocketAddr,
}

/// Starts `switchyard ARGS --metrics-addr 127.0.0.1:0` with the app's broker and namespace and
/// `database_url`, and waits for the address it serves at (from its log).
async fn serve(app: &TestApp, database_url: &str, args: &[&str]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("AMQP_URL", &app.config.amqp_url)
        .env("DATABASE_URL", database_url)
        .env("SWITCHYARD_NAMESPACE", app.config.namespace.as_str())
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .env_remove("SWITCHYARD_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the switchyard binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("serving /metrics") {
                let addr = line.split("address=").nth(1).expect("the address in the line");
                return addr.split_whitespace().next().unwrap().parse::<SocketAddr>().unwrap();
            }
        }
        panic!("the process ended without serving its metrics");
    })
    .await
    .expect("the process serves its metrics in time");
    // Its log goes on; read so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Served { child, addr }
}

impl Served {
    async fn get(&self, path: &str) -> (u16, String) {
        let response =
            reqwest::get(format!("http://{}{path}", self.addr)).await.expect("the endpoint answers");
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// The samples of `/metrics`, by series (`name{labels}`).
    async fn metrics(&self) -> BTreeMap<String, f64> {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200, "{text}");
        text.lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                Some((series.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    /// Polls `/readyz` until it answers `status`; what it said then.
    async fn wait_ready(&self, status: u16) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (got, body) = self.get("/readyz").await;
            if got == status {
                return body;
            }
            assert!(tokio::time::Instant::now() < deadline, "/readyz still answers {got}: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn sample(metrics: &BTreeMap<String, f64>, series: &str) -> f64 {
    metrics.get(series).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn a_worker_and_an_agent_serve_metrics_that_move_as_a_request_runs() {
    let app = spawn_bare_app(|_| {}).await;
    let worker = serve(&app, &app.config.database_url, &["worker"]).await;
    let agent_id = format!("ops-{}", &app.config.namespace.as_str()[1..9]);
    let capabilities = "deployment,shell,configuration,monitoring,notification";
    let agent = serve(
        &app,
        &app.config.database_url,
        &["agent", "--id", &agent_id, "--capabilities", capabilities, "--capacity", "2", "--speed", "0"],
    )
    .await;
    for process in [&worker, &agent] {
        assert_eq!(process.get("/healthz").await, (200, "ok\n".to_owned()));
        assert_eq!(process.wait_ready(200).await, "ready\n");
    }
    wait_registered(&app, &agent_id).await;
    let before = worker.metrics().await;

    let request = app.submit("Deploy Uptime Kuma to the homelab and send alerts to Discord", true).await;
    let report = app.wait_for(request, |r| r.status.as_str() == "completed").await;
    let tasks = report.plan.as_ref().expect("a plan").tasks.len() as f64;
    assert!(tasks >= 2.0, "{report:#?}");

    // The request's duration is read after its end is committed: a moment later.
    let mut after = worker.metrics().await;
    for _ in 0..50 {
        if sample(&after, "switchyard_request_seconds_count{outcome=\"completed\"}") >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = worker.metrics().await;
    }
    let moved = |series: &str| sample(&after, series) - sample(&before, series);
    for stage in ["decompose", "plan", "fallback", "route", "dispatch", "track"] {
        let series = format!("switchyard_messages_total{{stage=\"{stage}\",outcome=\"done\"}}");
        assert!(moved(&series) >= 1.0, "{series} did not move: {after:#?}");
        let series = format!("switchyard_handling_seconds_count{{stage=\"{stage}\"}}");
        assert!(moved(&series) >= 1.0, "{series} did not move");
        let series = format!("switchyard_commit_seconds_count{{stage=\"{stage}\",kind=\"writes\"}}");
        if stage != "dispatch" {
            assert!(moved(&series) >= 1.0, "{series} did not move");
        }
    }
    let series = "switchyard_commit_seconds_count{stage=\"dispatch\",kind=\"deliveries\"}";
    assert!(moved(series) >= 1.0, "{series} did not move");
    assert_eq!(moved("switchyard_routing_decisions_total{outcome=\"assigned\"}"), tasks);
    assert_eq!(moved("switchyard_task_wait_seconds_count"), tasks);
    assert_eq!(moved("switchyard_request_seconds_count{outcome=\"completed\"}"), 1.0);
    assert_eq!(sample(&after, "switchyard_consumers_running"), 8.0, "every stage consumes");
    assert!(after.contains_key("switchyard_database_connections{state=\"in_use\"}"), "{after:#?}");

    let agent_metrics = agent.metrics().await;
    let labels = format!("agent=\"{agent_id}\"");
    assert_eq!(
        sample(&agent_metrics, &format!("switchyard_agent_tasks_total{{{labels},outcome=\"succeeded\"}}")),
        tasks
    );
    assert_eq!(sample(&agent_metrics, &format!("switchyard_agent_task_seconds_count{{{labels}}}")), tasks);
    assert_eq!(sample(&agent_metrics, &format!("switchyard_agent_slots_total{{{labels}}}")), 2.0);
    assert_eq!(sample(&agent_metrics, &format!("switchyard_agent_slots_used{{{labels}}}")), 0.0);
    assert_eq!(
        sample(&agent_metrics, "switchyard_consumers_running"),
        2.0,
        "its tasks and its control queue"
    );

    // `probe`, as a container's health check runs it.
    for (args, code) in [(vec![], 0), (vec!["--ready"], 0)] {
        let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["probe", "--addr", &agent.addr.to_string()])
            .args(args)
            .output()
            .await
            .unwrap();
        assert_eq!(output.status.code(), Some(code), "{output:?}");
    }
}

/// A TCP relay to the database that the test can cut and restore: the database, as far as one
/// worker knows, goes away and comes back, while every other test keeps it.
struct Relay {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    links: Arc<Mutex<JoinSet<()>>>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let links = Arc::new(Mutex::new(JoinSet::new()));
        let (accepting, links_of) = (open.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    // Closed at once: what a client meets when the server is away.
                    drop(inbound);
                    continue;
                }
                links_of.lock().await.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Relay { addr, open, links }
    }

    /// The database goes away: open connections are cut, new ones closed at once.
    async fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.links.lock().await.shutdown().await;
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn readiness_follows_the_database_away_and_back() {
    let app = spawn_bare_app(|_| {}).await;
    let database: url::Url = app.config.database_url.parse().unwrap();
    let server =
        SocketAddr::new(database.host_str().unwrap().parse().unwrap(), database.port().unwrap_or(5432));
    let relay = Relay::start(server).await;
    let mut through_relay = database.clone();
    through_relay.set_port(Some(relay.addr.port())).unwrap();
    let worker = serve(&app, through_relay.as_str(), &["worker", "--stage", "route,track"]).await;
    assert_eq!(worker.wait_ready(200).await, "ready\n");

    relay.cut().await;
    let body = worker.wait_ready(503).await;
    assert!(body.starts_with("not ready: the database"), "{body}");
    assert_eq!(worker.get("/healthz").await.0, 200, "alive all the same");
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["probe", "--ready", "--addr", &worker.addr.to_string()])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("503"), "{output:?}");

    relay.restore();
    assert_eq!(worker.wait_ready(200).await, "ready\n");
    drop(worker.child);
}
