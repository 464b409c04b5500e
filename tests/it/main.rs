//! One integration binary: real sockets, a real in-process origin, the real `sidecache` binary.

#![forbid(unsafe_code)]

mod support;

mod cache;
mod cli;
mod compress;
mod conformance;
mod deploy;
mod hostile;
mod operator;
mod prime;
mod prime_house;
mod prometheus;
mod proxy;
mod room;
mod safety_admin;
mod safety_poison;
mod safety_request;
mod safety_rules;
mod safety_store;
mod semantics;
mod shared_tier;
mod supervise;
mod tags;
