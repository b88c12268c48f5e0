//! keyturn's integration tests: one binary, real RabbitMQ, the simulator over a socket, a real
//! SQLite file per test (or, for the fleet tests, a PostgreSQL database per test).

mod api_security;
mod audit_cli;
mod broker_tls;
mod circuits;
mod container;
mod credentials;
mod demo;
mod edge;
mod fleet;
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
