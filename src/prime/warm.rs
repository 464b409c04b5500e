//! The one priming loop inside the sidecar: warms a list of URLs through the cache, a bounded
//! number at once, each within a time limit, and reports one [`Line`] per URL as it completes.
//! `POST /prime` streams the lines to `sidecache prime`; `serve --prime FILE` tallies and logs
//! them. It does not decide retries: the command does, from each line's outcome.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::warn;

use super::protocol::{Failure, Line, WarmResult};
use crate::proxy::Proxy;
use crate::sources::SourceUrl;

/// Objects fetched at once by default (`prime --concurrency`, `serve --prime`).
pub const CONCURRENCY: usize = 8;

/// Time limit per object by default (`prime --timeout`, `serve --prime`).
pub const OBJECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How to warm a list.
#[derive(Debug, Clone)]
pub struct Job {
    /// The Host the app is reached by (part of the cache key) for paths in the list.
    pub host: String,
    /// Fill from this source instead of the app (already admitted by `prime_sources`).
    pub from: Option<SourceUrl>,
    /// Objects fetched at once (at least 1).
    pub concurrency: usize,
    /// Time limit per object.
    pub timeout: Duration,
}

/// Warms `targets` in a task of its own and returns the lines as they complete, one per
/// target (fewer only if a warm task panics). Warming goes on to the end when the receiver is
/// dropped: what the sidecar has started to store is worth finishing.
pub fn warm_all(proxy: Arc<Proxy>, targets: Vec<String>, job: Job) -> mpsc::Receiver<Line> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let job = Arc::new(job);
        let mut targets = targets.into_iter();
        let mut tasks = JoinSet::new();
        loop {
            while tasks.len() < job.concurrency.max(1) {
                let Some(target) = targets.next() else { break };
                tasks.spawn(warm_one(proxy.clone(), target, job.clone()));
            }
            let Some(done) = tasks.join_next().await else { break };
            match done {
                Ok(line) => {
                    let _ = tx.send(line).await;
                }
                Err(e) => warn!(error = %e, "a prime task failed"),
            }
        }
    });
    rx
}

async fn warm_one(proxy: Arc<Proxy>, target: String, job: Arc<Job>) -> Line {
    let result = match tokio::time::timeout(job.timeout, proxy.warm(&job.host, &target, job.from.as_ref())).await {
        Ok(result) => result,
        Err(_) => WarmResult::Failed(Failure::Timeout {
            seconds: job.timeout.as_secs(),
        }),
    };
    Line::new(target, result)
}
