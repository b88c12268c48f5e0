//! W3C Trace Context for jobs: the `traceparent` / `tracestate` a job arrives with, and the one
//! its result event leaves with.
//!
//! A job's span joins the sender's trace: same trace id, the sender's span as its parent, a span
//! id of its own. The result event carries `traceparent` = trace id + the job span's id + flags
//! (the CloudEvents distributed-tracing extension), so a consumer's work on the event becomes a
//! child of the job. A missing or malformed `traceparent` starts a new trace: tracing is advice
//! from the sender, never a reason to reject a job. Pure: no I/O, ids come from the caller or
//! `rand`.

use std::fmt;

/// Longest `tracestate` kept (W3C: a vendor may drop a longer one).
const TRACESTATE_MAX_LEN: usize = 512;
/// Most list members a `tracestate` may have (W3C).
const TRACESTATE_MAX_MEMBERS: usize = 32;
/// Flags of a trace keyturn starts itself: sampled, since keyturn records every job.
const SAMPLED: u8 = 0x01;

/// The trace headers as a message carries them, unchecked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// A parsed, valid `traceparent`: the sender's trace and span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

/// One job's place in a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    /// The job span's own id.
    pub span_id: u64,
    /// The sender's span, when the job arrived with a valid `traceparent`.
    pub parent_id: Option<u64>,
    pub flags: u8,
    /// Passed on unchanged when well-formed and the `traceparent` was valid.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The context of a job that arrived with `headers`, under a fresh span id.
    pub fn continue_from(headers: &TraceHeaders) -> TraceContext {
        Self::continue_with(headers, nonzero(rand::random), nonzero(rand::random))
    }

    /// [`TraceContext::continue_from`] with the ids a new trace or span would take.
    pub fn continue_with(headers: &TraceHeaders, new_trace: u128, span_id: u64) -> TraceContext {
        let parent = headers.traceparent.as_deref().and_then(parse_traceparent);
        let Some(parent) = parent else {
            return TraceContext {
                trace_id: new_trace,
                span_id,
                parent_id: None,
                flags: SAMPLED,
                tracestate: None,
            };
        };
        TraceContext {
            trace_id: parent.trace_id,
            span_id,
            parent_id: Some(parent.span_id),
            // Only the sampled bit is defined: W3C asks for the others to be sent as zero.
            flags: parent.flags & SAMPLED,
            tracestate: headers
                .tracestate
                .as_deref()
                .filter(|state| valid_tracestate(state))
                .map(str::to_owned),
        }
    }

    /// The `traceparent` of whatever the job sends on: this trace, the job's span as parent.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id_hex(),
            self.span_id_hex(),
            self.flags
        )
    }

    /// The headers a message sent on behalf of this job carries.
    pub fn outgoing(&self) -> TraceHeaders {
        TraceHeaders {
            traceparent: Some(self.traceparent()),
            tracestate: self.tracestate.clone(),
        }
    }

    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    pub fn parent_id_hex(&self) -> Option<String> {
        self.parent_id.map(|id| format!("{id:016x}"))
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

/// Parses a `traceparent` (W3C Trace Context level 1). Version `00` is exactly four fields; a
/// later version may append fields after a `-`, which are ignored, and `ff` is invalid.
pub fn parse_traceparent(value: &str) -> Option<Parent> {
    let (head, rest) = value.split_at_checked(55)?;
    let mut fields = head.split('-');
    let (version, trace, span, flags) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let version = hex_field(version, 2)? as u8;
    let future_tail = rest.is_empty() || (version > 0 && rest.starts_with('-'));
    if version == 0xff || !future_tail {
        return None;
    }
    let parent = Parent {
        trace_id: hex_field(trace, 32)?,
        span_id: hex_field(span, 16)? as u64,
        flags: hex_field(flags, 2)? as u8,
    };
    (parent.trace_id != 0 && parent.span_id != 0).then_some(parent)
}

/// A field of exactly `len` lowercase hex digits (W3C refuses uppercase).
fn hex_field(field: &str, len: usize) -> Option<u128> {
    let lower_hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
    if field.len() != len || !field.bytes().all(lower_hex) {
        return None;
    }
    u128::from_str_radix(field, 16).ok()
}

/// Whether `state` is a `tracestate` worth passing on: at most 512 characters and 32 members,
/// each `key=value` by the W3C grammar, no key twice.
pub fn valid_tracestate(state: &str) -> bool {
    if state.len() > TRACESTATE_MAX_LEN {
        return false;
    }
    let members: Vec<&str> = state
        .split(',')
        .map(|member| member.trim_matches([' ', '\t']))
        .filter(|member| !member.is_empty())
        .collect();
    if members.is_empty() || members.len() > TRACESTATE_MAX_MEMBERS {
        return false;
    }
    let mut keys = std::collections::HashSet::new();
    members.iter().all(|member| {
        member
            .split_once('=')
            .is_some_and(|(key, value)| valid_key(key) && valid_value(value) && keys.insert(key))
    })
}

/// `simple-key` or `tenant@system` (W3C Trace Context §3.3.1.3.1).
fn valid_key(key: &str) -> bool {
    let allowed = |c: u8| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'*' | b'/')
    };
    let part = |text: &str, max: usize, first_digit_ok: bool| {
        let first = text.bytes().next();
        !text.is_empty()
            && text.len() <= max
            && first
                .is_some_and(|c| c.is_ascii_lowercase() || (first_digit_ok && c.is_ascii_digit()))
            && text.bytes().all(allowed)
    };
    match key.split_once('@') {
        None => part(key, 256, false),
        Some((tenant, system)) => part(tenant, 241, true) && part(system, 14, false),
    }
}

/// 1-256 printable ASCII characters but `,` and `=`, not ending in a space.
fn valid_value(value: &str) -> bool {
    let allowed = |c: u8| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=';
    !value.is_empty() && value.len() <= 256 && !value.ends_with(' ') && value.bytes().all(allowed)
}

/// Draws until the id is not zero (an all-zero id is invalid).
fn nonzero<T: PartialEq + Default>(mut draw: impl FnMut() -> T) -> T {
    loop {
        let id = draw();
        if id != T::default() {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(traceparent: &str, tracestate: Option<&str>) -> TraceHeaders {
        TraceHeaders {
            traceparent: Some(traceparent.into()),
            tracestate: tracestate.map(str::to_owned),
        }
    }

    #[test]
    fn flags_other_than_sampled_are_sent_as_zero() {
        for (incoming, outgoing) in [("03", "01"), ("fe", "00"), ("00", "00")] {
            let ctx = TraceContext::continue_with(
                &headers(&format!("00-{TRACE}-{SPAN}-{incoming}"), None),
                7,
                9,
            );
            assert!(
                ctx.traceparent().ends_with(&format!("-{outgoing}")),
                "{incoming}"
            );
        }
    }

    #[test]
    fn a_valid_traceparent_becomes_the_parent_and_the_job_gets_its_own_span() {
        let incoming = format!("00-{TRACE}-{SPAN}-01");
        let ctx = TraceContext::continue_with(&headers(&incoming, Some("congo=t61rcWkgMzE")), 7, 9);
        assert_eq!(ctx.trace_id_hex(), TRACE);
        assert_eq!(ctx.parent_id_hex().as_deref(), Some(SPAN));
        assert_eq!(ctx.span_id, 9);
        assert_eq!(ctx.traceparent(), format!("00-{TRACE}-0000000000000009-01"));
        assert_eq!(ctx.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        let unsampled =
            TraceContext::continue_with(&headers(&format!("00-{TRACE}-{SPAN}-00"), None), 7, 9);
        assert_eq!(
            unsampled.traceparent(),
            format!("00-{TRACE}-0000000000000009-00")
        );
    }

    #[test]
    fn a_missing_or_malformed_traceparent_starts_a_new_trace_and_drops_tracestate() {
        let fresh = |traceparent: Option<&str>| {
            let headers = TraceHeaders {
                traceparent: traceparent.map(str::to_owned),
                tracestate: Some("congo=t61rcWkgMzE".into()),
            };
            TraceContext::continue_with(&headers, 0xabc, 0x5)
        };
        let zero_trace = format!("00-{}-{SPAN}-01", "0".repeat(32));
        let zero_span = format!("00-{TRACE}-{}-01", "0".repeat(16));
        let upper = format!("00-{}-{SPAN}-01", TRACE.to_uppercase());
        let bad_version = format!("ff-{TRACE}-{SPAN}-01");
        let non_hex_version = format!("0x-{TRACE}-{SPAN}-01");
        let short_trace = format!("00-{}-{SPAN}-01", &TRACE[1..]);
        let long = format!("00-{TRACE}-{SPAN}-01-extra");
        let bad_flags = format!("00-{TRACE}-{SPAN}-1");
        for bad in [
            None,
            Some(""),
            Some(zero_trace.as_str()),
            Some(zero_span.as_str()),
            Some(upper.as_str()),
            Some(bad_version.as_str()),
            Some(non_hex_version.as_str()),
            Some(short_trace.as_str()),
            Some(long.as_str()),
            Some(bad_flags.as_str()),
        ] {
            let ctx = fresh(bad);
            assert_eq!(ctx.trace_id, 0xabc, "{bad:?}");
            assert_eq!(ctx.parent_id, None, "{bad:?}");
            assert_eq!(ctx.tracestate, None, "{bad:?}");
            assert_eq!(
                ctx.traceparent(),
                format!("00-{:032x}-{:016x}-01", 0xabc, 5)
            );
        }
    }

    #[test]
    fn a_later_version_may_append_fields() {
        let future = format!("01-{TRACE}-{SPAN}-01-more");
        assert!(parse_traceparent(&future).is_some());
        assert!(parse_traceparent(&format!("01-{TRACE}-{SPAN}-01x")).is_none());
    }

    #[test]
    fn tracestate_is_kept_only_when_well_formed_and_within_limits() {
        assert!(valid_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
        assert!(valid_tracestate("fw529a3039@dt=ZmYyNzc1, rojo=1"));
        assert!(!valid_tracestate(""));
        assert!(!valid_tracestate("Rojo=1"), "keys are lowercase");
        assert!(!valid_tracestate("rojo"), "a member is key=value");
        assert!(!valid_tracestate("rojo=1,rojo=2"), "a key appears once");
        assert!(!valid_tracestate("rojo=a,b"));
        let members = |n: usize| {
            (0..n)
                .map(|i| format!("k{i}=v"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert!(valid_tracestate(&members(32)));
        assert!(!valid_tracestate(&members(33)));
        let long = format!("k={}", "v".repeat(TRACESTATE_MAX_LEN - 2));
        assert_eq!(long.len(), 512);
        assert!(
            !valid_tracestate(&long),
            "a value is at most 256 characters"
        );
        let at_limit = format!("a={},b={}", "v".repeat(254), "v".repeat(253));
        assert_eq!(at_limit.len(), 512);
        assert!(valid_tracestate(&at_limit));
        assert!(
            !valid_tracestate(&format!("{at_limit}v")),
            "over 512 characters"
        );
    }

    #[test]
    fn fresh_ids_are_never_zero_and_differ_per_job() {
        let a = TraceContext::continue_from(&TraceHeaders::default());
        let b = TraceContext::continue_from(&TraceHeaders::default());
        assert!(a.trace_id != 0 && a.span_id != 0);
        assert_ne!(a.span_id, b.span_id);
        assert!(parse_traceparent(&a.traceparent()).is_some());
    }
}
