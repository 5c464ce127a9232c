//! proxy-daemon: a node-level transparent proxy for Kubernetes pods.
//!
//! Data flows one way: config source ([`config`]) → store → compile → snapshot ([`state`])
//! → enrolment ([`capture`]) and data path ([`proxy`]) → report (metrics, access log) →
//! admin. Generic plumbing (admin server, metrics registry, telemetry, readiness) sits at
//! the top; [`app`] wires it all in one place.
// ConfigError carries file, line, object and message by design; it is built on the
// configuration path, never per connection.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod app;
pub mod capture;
pub mod cli;
pub mod config;
/// What the fuzz targets run, shared with the regression replay of what they found.
#[cfg(any(test, feature = "testing"))]
pub mod fuzzing;
pub mod handover;
pub mod identity;
pub mod memory;
pub mod metrics;
pub mod proxy;
pub mod readiness;
pub mod spans;
pub mod state;
pub mod telemetry;
/// The data path in-process (no root), for this crate's tests and, with the `testing`
/// feature, for others'.
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod top;
pub mod validate;
pub mod version;
