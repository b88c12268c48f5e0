//! keyturn turns backup encryption on or off for GaussDB (for MySQL) / TaurusDB instances across
//! a fleet. Jobs arrive on a RabbitMQ quorum queue, one per instance; each is validated, sent to
//! the cloud API under rate limits and retries, recorded in an append-only SQLite audit log, and
//! announced as a CloudEvents result on a topic exchange — and only then acknowledged.
//!
//! # Layout
//!
//! A delivery flows one way through these modules:
//!
//! - [`amqp`]: connections, topology, the consuming worker (ack/reject) and the confirmed publisher.
//! - [`job`]: bytes → a valid [`job::Job`] or a [`job::Rejection`] naming the field.
//! - [`pipeline`]: idempotency, rate limits, retries, and the decision to ack or dead-letter.
//! - [`circuit`]: faults of the deployment (credentials, endpoints) that hold work, not fail it.
//! - [`limits`] and [`retry`]: governor limiters, the 429 pause, the retry table and backoff.
//! - [`gaussdb`]: the signed HTTP client, the pure SDK-HMAC-SHA256 signer, the region table.
//! - [`audit`]: the SQLite log and the in-flight markers that make redeliveries safe.
//! - [`events`]: the CloudEvents result documents.
//! - [`trace`]: W3C trace context from a job's headers to its span and its result event.
//! - [`simulator`]: a local stand-in for the cloud API, for the demo, tests and benchmarks.
//! - [`rollout`] and [`plan_file`]: rollout plans and commands, and the files `submit` reads.
//! - [`ops`]: Prometheus metrics and the `/metrics`, `/livez`, `/readyz` endpoint.
//! - [`config`] and [`cli`]: settings and the `keyturn` subcommands.
#![forbid(unsafe_code)]

pub mod amqp;
pub mod audit;
pub mod circuit;
pub mod cli;
pub mod config;
pub mod events;
pub mod gaussdb;
pub mod job;
pub mod limits;
pub mod ops;
pub mod pipeline;
pub mod plan_file;
pub mod retry;
pub mod rollout;
pub mod simulator;
pub mod telemetry;
pub mod trace;
