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
