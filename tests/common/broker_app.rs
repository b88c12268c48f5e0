//! Stopping and starting the local broker's application, for the test binaries that restart it
//! (`tests/restart.rs`, `tests/watch_restart.rs`): each runs alone, so no other test's
//! connections are cut.

/// Runs `rabbitmqctl` with `args`, asserting that it succeeded.
pub fn rabbitmqctl(args: &[&str]) {
    let output = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl is installed with the broker");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Starts the broker's application again even if the test panics while it is stopped.
pub struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .output();
    }
}

/// Stops the broker's application and checks it was the one at `url` (the test's and the
/// worker's, not another one named by KEYTURN_TEST_AMQP_URL); the guard starts it again if the
/// test panics before [`start_broker`].
pub async fn stop_broker(url: &str) -> RestartOnDrop {
    let restart = RestartOnDrop;
    rabbitmqctl(&["stop_app"]);
    let uri: lapin::uri::AMQPUri = url.parse().unwrap();
    let address = format!("{}:{}", uri.authority.host, uri.authority.port);
    assert!(
        tokio::net::TcpStream::connect(&address).await.is_err(),
        "rabbitmqctl stopped another broker than {address} (KEYTURN_TEST_AMQP_URL?)"
    );
    restart
}

/// Starts the broker's application again and waits until it serves.
pub fn start_broker(stopped: RestartOnDrop) {
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    drop(stopped);
}
