//! Integration tests: real replicas on loopback sockets, one test binary.

mod replica;
mod support;
