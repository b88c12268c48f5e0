//! keyturn's integration tests: one binary, real RabbitMQ, the simulator over a socket, a real
//! SQLite file per test.

mod api_security;
mod audit_cli;
mod broker_tls;
mod circuits;
mod container;
mod credentials;
mod demo;
mod edge;
mod guarantees;
mod helpers;
mod identity;
mod lifecycle;
mod ops;
mod pipeline;
mod properties;
mod rollouts;
mod submit;
mod tracing;
mod watch;
