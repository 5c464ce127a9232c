//! proxy-daemon: a node-level transparent proxy for Kubernetes pods.
//!
//! Data flows one way: config source → store → compile ([`state`]) → snapshot →
//! enrolment ([`enrol`]) and data path ([`proxy`]) → metrics/admin.
// ConfigError carries file, line, object and message by design; it is built on the
// configuration path, never per connection.
#![allow(clippy::result_large_err)]

pub mod access_log;
pub mod admin;
pub mod app;
pub mod bpf;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod dns;
pub mod enrol;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod readiness;
pub mod registry;
pub mod routes;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod top;
pub mod validate;
pub mod version;
pub mod workload;
