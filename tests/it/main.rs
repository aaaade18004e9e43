//! Integration tests: real replicas on loopback sockets, one test binary.

mod anycall;
mod balancer;
mod blackhole;
mod cli;
mod connection;
mod dns;
mod dns_server;
mod docs;
mod hardening;
mod manifests;
mod metrics;
mod replica;
mod support;
mod tls;
mod tracing;
mod uncooperative;
