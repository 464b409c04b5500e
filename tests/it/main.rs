//! One integration binary: real sockets, a real in-process origin, the real `sidecache` binary.

mod support;

mod cli;
mod proxy;
mod supervise;
