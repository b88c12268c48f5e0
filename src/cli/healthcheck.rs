//! `keyturn healthcheck`: one GET of the worker's `/readyz` (or `--url`), for container
//! healthchecks in an image that has no curl. Exit 0 on 200, 1 on anything else, with one short
//! line saying why on stdout (Docker keeps it in the container's health log).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use crate::config::{ConfigError, OpsSettings, Settings};

/// Longest reason quoted from a refusal's body: the line must stay short.
const MAX_REASON: usize = 300;

#[derive(clap::Args, Debug)]
pub struct HealthcheckArgs {
    /// URL to GET instead of http://<ops.listen>/readyz (e.g. the simulator's
    /// http://127.0.0.1:8600/_simulator/health).
    #[arg(long)]
    pub url: Option<String>,
    /// How long to wait for the answer (e.g. 2s).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Checks once and prints the verdict; a bad `--url` or `ops.listen` is a [`ConfigError`].
pub async fn run(settings: &Settings, args: HealthcheckArgs) -> anyhow::Result<ExitCode> {
    let url = match args.url {
        Some(url) => parse_url(&url)?,
        None => parse_url(&default_url(&settings.ops)?)?,
    };
    let (ready, line) = check(&url, args.timeout).await?;
    println!("{line}");
    Ok(if ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `http://<ops.listen>/readyz`, reaching a wildcard listen address over loopback.
fn default_url(ops: &OpsSettings) -> Result<String, ConfigError> {
    let Some(address) = ops.address()? else {
        return Err(ConfigError {
            key: "ops.listen".into(),
            problem: "is empty, so the worker serves no /readyz; set it or give --url".into(),
        });
    };
    Ok(format!("http://{}/readyz", reachable(address)))
}

/// A listener on 0.0.0.0 or [::] is reached on the loopback address of its family.
fn reachable(address: SocketAddr) -> SocketAddr {
    let ip = match address.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, address.port())
}

fn parse_url(url: &str) -> Result<reqwest::Url, ConfigError> {
    let problem = |problem: String| ConfigError {
        key: "--url".into(),
        problem,
    };
    let parsed = reqwest::Url::parse(url).map_err(|error| problem(format!("{url:?}: {error}")))?;
    match parsed.scheme() {
        "http" | "https" => Ok(parsed),
        other => Err(problem(format!(
            "{url:?}: must be http or https, not {other}"
        ))),
    }
}

/// GETs `url` once: (ready, the line to print).
async fn check(url: &reqwest::Url, timeout: Duration) -> anyhow::Result<(bool, String)> {
    // No proxy: HTTP_PROXY in a container's environment must not route a loopback check away.
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .no_proxy()
        .build()?;
    let response = match client.get(url.clone()).send().await {
        Ok(response) => response,
        Err(error) => {
            return Ok((
                false,
                format!("not ready: {}", unreachable(url, &error, timeout)),
            ));
        }
    };
    let status = response.status();
    if status == reqwest::StatusCode::OK {
        return Ok((true, format!("ready: {url} answered {status}")));
    }
    let body = response.text().await.unwrap_or_default();
    let line = match reason(&body) {
        Some(reason) => format!("not ready: {url} answered {status}: {reason}"),
        None => format!("not ready: {url} answered {status}"),
    };
    Ok((false, line))
}

/// Why nothing answered, in words: the innermost cause (e.g. "Connection refused").
fn unreachable(url: &reqwest::Url, error: &reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        let timeout = humantime::format_duration(timeout);
        return format!("no answer from {url} within {timeout}");
    }
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    if error.is_connect() {
        format!("cannot connect to {url}: {cause}")
    } else {
        format!("asking {url} failed: {cause}")
    }
}

/// A refusal's body on one line: JSON re-printed compactly, text with its whitespace folded,
/// either cut to [`MAX_REASON`] characters; `None` when empty.
fn reason(body: &str) -> Option<String> {
    let folded = match serde_json::from_str::<serde_json::Value>(body) {
        Ok(json) => json.to_string(),
        Err(_) => body.split_whitespace().collect::<Vec<_>>().join(" "),
    };
    if folded.is_empty() {
        return None;
    }
    Some(match folded.char_indices().nth(MAX_REASON) {
        Some((end, _)) => format!("{}…", &folded[..end]),
        None => folded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listen_address_is_reached_over_loopback() {
        let ops = |listen: &str| OpsSettings {
            listen: listen.into(),
        };
        assert_eq!(
            default_url(&ops("0.0.0.0:9464")).unwrap(),
            "http://127.0.0.1:9464/readyz"
        );
        assert_eq!(
            default_url(&ops("[::]:9464")).unwrap(),
            "http://[::1]:9464/readyz"
        );
        assert_eq!(
            default_url(&ops("10.1.2.3:80")).unwrap(),
            "http://10.1.2.3:80/readyz"
        );
    }

    #[test]
    fn an_empty_ops_listen_names_the_key() {
        let error = default_url(&OpsSettings {
            listen: String::new(),
        })
        .unwrap_err();
        assert_eq!(error.key, "ops.listen");
        assert!(error.problem.contains("--url"), "{}", error.problem);
    }

    #[test]
    fn a_url_that_is_not_http_is_refused() {
        assert_eq!(parse_url("ftp://127.0.0.1/").unwrap_err().key, "--url");
        assert_eq!(parse_url("127.0.0.1:9464").unwrap_err().key, "--url");
        assert!(parse_url("http://127.0.0.1:9464/readyz").is_ok());
    }

    #[test]
    fn a_reason_is_one_short_line() {
        assert_eq!(
            reason("{\n  \"ready\": false,\n  \"reason\": \"broker down\"\n}").unwrap(),
            r#"{"ready":false,"reason":"broker down"}"#
        );
        assert_eq!(reason("not\n ready\n").unwrap(), "not ready");
        assert_eq!(reason(" \n"), None);
        let long = reason(&"x".repeat(1000)).unwrap();
        assert_eq!(long.chars().count(), MAX_REASON + 1);
    }
}
