//! Circuits: faults of the deployment, not of an instance, hold work instead of failing it.
//!
//! Refused credentials and a skewed clock open the `credentials` circuit (every API call is held);
//! connect errors, or a run of server errors and timeouts from one region's endpoint, open that
//! region's circuit. While a circuit is open no job of its scope calls the API: the pipeline parks
//! them in the store and a probe (Describe of the job that tripped it, with capped backoff) tests
//! the scope until it serves again. One ERROR line when a circuit opens, one when it closes.
//!
//! This module is the state and the classification, pure of HTTP and storage: the pipeline feeds
//! it every answer and asks it before every call.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Credentials;
use crate::gaussdb::CallError;

/// What a circuit holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every call: the credentials or the clock are refused.
    Credentials,
    /// Calls to one region's endpoint.
    Region(String),
}

impl Scope {
    /// The scope's name in the store and in logs: `credentials` or `region:<id>`.
    pub fn key(&self) -> String {
        match self {
            Scope::Credentials => "credentials".into(),
            Scope::Region(region) => format!("region:{region}"),
        }
    }

    pub fn from_key(key: &str) -> Option<Scope> {
        match key.split_once(':') {
            None if key == "credentials" => Some(Scope::Credentials),
            Some(("region", region)) if !region.is_empty() => Some(Scope::Region(region.into())),
            _ => None,
        }
    }
}

/// A fault of the deployment seen in one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub scope: Scope,
    /// What happened, e.g. `credentials refused by cn-north-4 (APIGW.0301)`.
    pub cause: String,
    /// What the operator should do.
    pub fix: String,
}

/// How the worker authenticates, for the fix a refusal suggests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    AkSk,
    /// Temporary AK/SK with a security token, from the environment.
    TemporaryAkSk,
    /// Temporary AK/SK from the ECS metadata service.
    Metadata,
    Token,
    /// A token fetched from IAM.
    Iam,
}

impl AuthMode {
    pub fn of(credentials: &Credentials) -> AuthMode {
        match credentials {
            Credentials::AkSk { .. } => AuthMode::AkSk,
            Credentials::TemporaryAkSk { .. } => AuthMode::TemporaryAkSk,
            Credentials::Metadata { .. } => AuthMode::Metadata,
            Credentials::Token(_) => AuthMode::Token,
            Credentials::Iam(_) => AuthMode::Iam,
        }
    }

    /// What to check when the API refuses the credentials.
    fn refused_fix(self) -> &'static str {
        match self {
            AuthMode::AkSk => "check CLOUD_SDK_AK/CLOUD_SDK_SK",
            AuthMode::TemporaryAkSk => {
                "check CLOUD_SDK_AK/CLOUD_SDK_SK/CLOUD_SDK_SECURITY_TOKEN (temporary keys expire)"
            }
            AuthMode::Metadata => {
                "check the ECS instance's agency and its permissions; probes fetch fresh keys"
            }
            AuthMode::Token => "check the IAM token (KEYTURN_API__TOKEN)",
            AuthMode::Iam => {
                "check the IAM user's permissions in the job's project (api.iam_user); probes fetch a fresh token"
            }
        }
    }

    /// What to check when no credential could be fetched.
    fn fetch_fix(self) -> &'static str {
        match self {
            AuthMode::Metadata => {
                "check the ECS metadata service (api.metadata_url) and that the instance has an agency"
            }
            AuthMode::Iam => {
                "check api.iam_endpoint, api.iam_domain, api.iam_user and KEYTURN_API__IAM_PASSWORD"
            }
            other => other.refused_fix(),
        }
    }
}

/// What one answer says about the deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// The endpoint answered as a service does (success or the instance's own error).
    Healthy,
    /// A server error or a timeout: one of a run that opens the region's circuit.
    Strike,
    /// A fault that opens its circuit at once.
    Fault(Fault),
}

/// Reads one answer (`Ok` = the API answered with a state) for `region`.
pub fn classify(result: &Result<(), CallError>, region: &str, auth: AuthMode) -> Signal {
    let Err(error) = result else {
        return Signal::Healthy;
    };
    match error {
        CallError::Api { status, code, .. } => {
            let code = code.as_deref().unwrap_or("-");
            match (*status, code) {
                (401 | 403, "APIGW.0303") => Signal::Fault(Fault {
                    scope: Scope::Credentials,
                    cause: format!("signatures refused as expired by {region} ({code})"),
                    fix: "check this host's clock (NTP): the gateway refuses a signing time more than 15 min off".into(),
                }),
                (401, _) => Signal::Fault(Fault {
                    scope: Scope::Credentials,
                    cause: format!("credentials refused by {region} ({code})"),
                    fix: auth.refused_fix().into(),
                }),
                (500..=599, _) => Signal::Strike,
                _ => Signal::Healthy,
            }
        }
        CallError::Connect(detail) => Signal::Fault(Fault {
            scope: Scope::Region(region.into()),
            cause: format!("the endpoint of {region} is unreachable ({detail})"),
            fix: "check api.endpoint, DNS, the network path and TLS to it".into(),
        }),
        CallError::Credentials(detail) => Signal::Fault(Fault {
            scope: Scope::Credentials,
            cause: format!("no credentials for {region}: {detail}"),
            fix: auth.fetch_fix().into(),
        }),
        CallError::Timeout => Signal::Strike,
        CallError::Protocol(_) => Signal::Healthy,
    }
}

/// An open circuit.
#[derive(Debug, Clone)]
pub struct Open {
    pub fault: Fault,
    pub opened_at: Instant,
}

/// The circuits of one worker.
pub struct Circuits {
    state: Mutex<State>,
    /// Bumped on every open and close, so waiters can watch for changes.
    changes: watch::Sender<u64>,
    strikes_to_open: u32,
}

#[derive(Default)]
struct State {
    open: HashMap<Scope, Open>,
    strikes: HashMap<String, u32>,
}

impl Circuits {
    /// `strikes_to_open`: server errors or timeouts in a row from one region that open its circuit.
    pub fn new(strikes_to_open: u32) -> Circuits {
        Circuits {
            state: Mutex::new(State::default()),
            changes: watch::Sender::new(0),
            strikes_to_open: strikes_to_open.max(1),
        }
    }

    /// The open circuit that holds calls to `region`, if any (credentials first).
    pub fn holding(&self, region: &str) -> Option<Scope> {
        let state = self.state.lock().expect("circuits lock");
        [Scope::Credentials, Scope::Region(region.into())]
            .into_iter()
            .find(|scope| state.open.contains_key(scope))
    }

    pub fn is_open(&self, scope: &Scope) -> bool {
        self.state
            .lock()
            .expect("circuits lock")
            .open
            .contains_key(scope)
    }

    /// The open circuits: scope key and cause.
    pub fn open(&self) -> Vec<(String, String)> {
        let state = self.state.lock().expect("circuits lock");
        let mut open: Vec<_> = state
            .open
            .iter()
            .map(|(scope, open)| (scope.key(), open.fault.cause.clone()))
            .collect();
        open.sort();
        open
    }

    /// Whether any circuit is open.
    pub fn any_open(&self) -> bool {
        !self.state.lock().expect("circuits lock").open.is_empty()
    }

    /// Feeds one answer from `region`; returns the fault when this answer opened a circuit (the
    /// caller then starts its probe). A fault whose circuit is already open returns `None`.
    pub fn report(&self, region: &str, signal: Signal) -> Option<Fault> {
        let mut state = self.state.lock().expect("circuits lock");
        let fault = match signal {
            Signal::Healthy => {
                state.strikes.remove(region);
                return None;
            }
            Signal::Strike => {
                let strikes = state.strikes.entry(region.to_owned()).or_insert(0);
                *strikes = strikes.saturating_add(1);
                if *strikes < self.strikes_to_open {
                    return None;
                }
                let strikes = *strikes;
                state.strikes.remove(region);
                Fault {
                    scope: Scope::Region(region.into()),
                    cause: format!(
                        "the endpoint of {region} answered {strikes} server errors or timeouts in a row"
                    ),
                    fix: "the service or its gateway is failing; calls resume when a probe passes"
                        .into(),
                }
            }
            Signal::Fault(fault) => fault,
        };
        if state.open.contains_key(&fault.scope) {
            return None;
        }
        tracing::error!(
            scope = %fault.scope.key(),
            cause = %fault.cause,
            fix = %fault.fix,
            "circuit opened: {}: {}; holding its jobs (parked, not failed) and probing",
            fault.cause,
            fault.fix
        );
        state.open.insert(
            fault.scope.clone(),
            Open {
                fault: fault.clone(),
                opened_at: Instant::now(),
            },
        );
        drop(state);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        Some(fault)
    }

    /// Closes `scope` after a probe passed; its parked jobs may run again.
    pub fn close(&self, scope: &Scope) {
        let open = self.state.lock().expect("circuits lock").open.remove(scope);
        if let Some(open) = open {
            tracing::error!(
                scope = %scope.key(),
                held_for_ms = open.opened_at.elapsed().as_millis() as u64,
                "circuit closed: {} no longer holds; releasing its parked jobs",
                scope.key()
            );
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// A receiver that sees every open and close.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, code: &str) -> Result<(), CallError> {
        Err(CallError::Api {
            status,
            code: Some(code.into()),
            msg: None,
            retry_after: None,
        })
    }

    #[test]
    fn deployment_faults_are_told_from_the_instances_own() {
        let scope = |result| match classify(&result, "cn-north-4", AuthMode::AkSk) {
            Signal::Fault(fault) => Some(fault.scope),
            _ => None,
        };
        assert_eq!(scope(api(401, "APIGW.0301")), Some(Scope::Credentials));
        assert_eq!(scope(api(403, "APIGW.0303")), Some(Scope::Credentials));
        assert_eq!(
            scope(Err(CallError::Connect("refused".into()))),
            Some(Scope::Region("cn-north-4".into()))
        );
        for own in [
            api(400, "DBS.200001"),
            api(403, "DBS.200010"),
            api(404, "DBS.200002"),
        ] {
            assert_eq!(
                classify(&own, "cn-north-4", AuthMode::AkSk),
                Signal::Healthy
            );
        }
        assert_eq!(
            classify(&api(503, "X"), "r", AuthMode::AkSk),
            Signal::Strike
        );
        assert_eq!(
            classify(&Err(CallError::Timeout), "r", AuthMode::AkSk),
            Signal::Strike
        );
    }

    #[test]
    fn the_fix_names_the_credentials_in_use() {
        let Signal::Fault(fault) = classify(&api(401, "APIGW.0301"), "cn-north-4", AuthMode::AkSk)
        else {
            panic!("a 401 is a fault")
        };
        assert_eq!(
            fault.cause,
            "credentials refused by cn-north-4 (APIGW.0301)"
        );
        assert!(fault.fix.contains("CLOUD_SDK_AK/CLOUD_SDK_SK"));
    }

    #[test]
    fn a_failed_fetch_holds_every_call_and_names_its_source() {
        let error = Err(CallError::Credentials(
            "IAM at https://iam.example.com/v3/auth/tokens answered HTTP 401: -".into(),
        ));
        let Signal::Fault(fault) = classify(&error, "cn-north-4", AuthMode::Iam) else {
            panic!("a failed fetch is a fault")
        };
        assert_eq!(fault.scope, Scope::Credentials);
        assert!(
            fault.cause.contains("https://iam.example.com"),
            "{}",
            fault.cause
        );
        assert!(fault.fix.contains("api.iam_endpoint"), "{}", fault.fix);
        let Signal::Fault(fault) = classify(&error, "cn-north-4", AuthMode::Metadata) else {
            panic!("a failed fetch is a fault")
        };
        assert!(fault.fix.contains("api.metadata_url"), "{}", fault.fix);
    }

    #[test]
    fn a_run_of_strikes_opens_a_region_and_a_healthy_answer_resets_it() {
        let circuits = Circuits::new(3);
        assert!(circuits.report("r1", Signal::Strike).is_none());
        assert!(circuits.report("r1", Signal::Strike).is_none());
        assert!(circuits.report("r1", Signal::Healthy).is_none());
        assert!(circuits.report("r1", Signal::Strike).is_none());
        assert!(circuits.report("r1", Signal::Strike).is_none());
        assert!(circuits.report("r2", Signal::Strike).is_none());
        let opened = circuits.report("r1", Signal::Strike).unwrap();
        assert_eq!(opened.scope, Scope::Region("r1".into()));
        assert_eq!(circuits.holding("r1"), Some(Scope::Region("r1".into())));
        assert_eq!(circuits.holding("r2"), None);
        circuits.close(&Scope::Region("r1".into()));
        assert_eq!(circuits.holding("r1"), None);
    }

    #[test]
    fn the_credentials_circuit_holds_every_region_and_opens_once() {
        let circuits = Circuits::new(5);
        let mut changes = circuits.watch();
        let fault = || classify(&api(401, "APIGW.0301"), "r1", AuthMode::AkSk);
        assert!(circuits.report("r1", fault()).is_some());
        assert!(circuits.report("r1", fault()).is_none(), "already open");
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(circuits.holding("anywhere"), Some(Scope::Credentials));
        circuits.close(&Scope::Credentials);
        assert!(changes.has_changed().unwrap());
        assert_eq!(circuits.holding("anywhere"), None);
    }

    #[test]
    fn scope_keys_round_trip() {
        for scope in [Scope::Credentials, Scope::Region("cn-north-4".into())] {
            assert_eq!(Scope::from_key(&scope.key()), Some(scope));
        }
        assert_eq!(Scope::from_key("rollout:x"), None);
        assert_eq!(Scope::from_key("region:"), None);
    }
}
