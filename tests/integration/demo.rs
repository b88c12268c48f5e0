//! `keyturn demo`: the real binary on the real broker tells the whole story and cleans up.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

fn names(kind: &str) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["-q", kind, "name"])
        .output()
        .expect("rabbitmqctl is installed with the broker");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn the_demo_tells_the_story_of_a_halted_fixed_and_retried_rollout() {
    let url = broker_url().await;
    let started = Instant::now();
    let output = tokio::task::spawn_blocking(move || {
        keyturn_binary()
            .arg("demo")
            .env("KEYTURN_AMQP__URL", url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    eprintln!("{stdout}\n(stderr)\n{stderr}\n(took {took:?})");
    assert_eq!(output.status.code(), Some(0));
    assert!(took < Duration::from_secs(20), "the demo took {took:?}");
    assert!(stdout.lines().count() <= 50, "the summary fits one screen");

    let ordered = [
        "1. submit",
        "rollout DEMO-",
        "2. canary   the first 3 jobs ran alone and all succeeded",
        "3. halted   4 instances lack the key grant (403 DBS.200010); failure budget exceeded: 3 failures, 2 allowed",
        "4. fix",
        "resumed  the parked jobs ran: completed with",
        "5. retry",
        "now 40 of 40 succeeded, 0 failed",
        "6. rejected",
        "What happened, in plain words:",
        "  failed     the job was valid but the API refused it",
        "  rejected   the job itself was invalid",
        "rollout events in order: declared, started, progress, ",
        "One event, as a consumer",
        "keyturn audit --rollout DEMO-",
        "keyturn audit report DEMO-",
        "keyturn worker",
        "keyturn watch",
        "are deleted; its files stay in",
    ];
    let mut from = 0;
    for part in ordered {
        let at = stdout[from..]
            .find(part)
            .unwrap_or_else(|| panic!("{part:?} after byte {from} of:\n{stdout}"));
        from += at + part.len();
    }
    // A progress event goes out at most once a second: how many fall before the halt and after
    // the resume depends on how fast the machine runs the jobs. The other events come once each,
    // in this order.
    let order = stdout
        .lines()
        .find_map(|line| line.split("rollout events in order: ").nth(1))
        .expect("the events line");
    let changes: Vec<&str> = order.split(", ").filter(|e| *e != "progress").collect();
    assert_eq!(
        changes,
        ["declared", "started", "halted", "resumed", "completed"],
        "{order}"
    );
    let parked: u64 = stdout
        .lines()
        .find_map(|line| {
            line.split(" parked: held back")
                .next()
                .filter(|_| line.contains("parked: held back"))
        })
        .and_then(|part| part.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the halt line says how many were parked");
    assert!(parked > 0, "the halt parked jobs");
    assert!(stdout.contains(", 1 rejected, 0 cancelled"), "{stdout}");

    // The sample event is one JSON line a consumer can parse.
    let event: Value = stdout
        .lines()
        .skip_while(|line| !line.starts_with("One event"))
        .nth(1)
        .and_then(|line| serde_json::from_str(line).ok())
        .expect("a JSON event after its heading");
    assert_eq!(event["type"], "dev.keyturn.job.failed");
    assert_eq!(event["data"]["error_code"], "DBS.200010");

    // Its queues and exchanges are gone; its files are where it says.
    let run_id = stdout
        .split("(keyturn.demo.")
        .nth(1)
        .and_then(|rest| rest.split('.').next())
        .expect("the run id")
        .to_owned();
    let prefix = format!("keyturn.demo.{run_id}");
    assert!(
        !names("list_queues").contains(&prefix),
        "queues left behind"
    );
    assert!(
        !names("list_exchanges").contains(&prefix),
        "exchanges left behind"
    );
    let dir = std::env::temp_dir().join(format!("keyturn-demo-{run_id}"));
    assert!(stdout.contains(&dir.display().to_string()));
    assert!(dir.join("audit.db").exists());
    std::fs::remove_dir_all(dir).unwrap();
}
