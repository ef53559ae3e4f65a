//! The end-to-end suite, one test binary: every module starts the real gateway (in-process, or the
//! real `toolgate` binary) in front of real upstreams on 127.0.0.1 and talks to it over HTTP.
//!
//! One binary rather than one per file: each links the whole crate and the AWS SDK, so eleven of
//! them cost eleven links and gigabytes of disk for no isolation the tests need (no test touches
//! process-global state: environment, recorder or working directory).

mod support;

mod admin;
mod approvers;
mod audit_chain;
mod aws;
mod cli;
mod content;
mod gateway;
mod hardening;
mod inbox;
mod jwt;
mod kubernetes;
mod limits;
mod mcp;
mod oidc;
mod replay;
mod replicas;
mod rules;
mod schema;
mod shadow;
mod telemetry;
mod tls_listeners;
mod tls_upstream;
mod upstream_pool;
mod webhooks;
