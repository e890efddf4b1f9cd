//! Group commit for the HTTP sources: concurrent requests' events are inserted together, in one
//! statement and one durable commit, and each request is answered only after that commit.
//! Under load this turns many small transactions (each waiting for its own WAL flush) into a
//! few larger ones; a lone request still goes out at once.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Mutex};
use tracing::debug;

use crate::db::event::{self, NewEvent};

/// Requests taken into one transaction at most.
const MAX_BATCH: usize = 256;
/// Transactions in flight at once.
const COMMITTERS: usize = 4;

/// The outcome a request waits for: how many of its events were new.
pub type Reply = Result<u64, Arc<sqlx::Error>>;

struct Job {
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Reply>,
}

#[derive(Clone)]
pub struct Ingest {
    tx: mpsc::Sender<Job>,
}

impl Ingest {
    pub fn start(pool: PgPool) -> Self {
        let (tx, rx) = mpsc::channel::<Job>(4096);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..COMMITTERS {
            tokio::spawn(committer(pool.clone(), rx.clone()));
        }
        Ingest { tx }
    }

    /// Records the events durably; returns how many were new (the rest were duplicates).
    pub async fn record(&self, events: Vec<NewEvent>) -> Reply {
        let (reply, wait) = oneshot::channel();
        if self.tx.send(Job { events, reply }).await.is_err() {
            return Err(Arc::new(sqlx::Error::PoolClosed));
        }
        wait.await.unwrap_or(Err(Arc::new(sqlx::Error::PoolClosed)))
    }
}

async fn committer(pool: PgPool, rx: Arc<Mutex<mpsc::Receiver<Job>>>) {
    loop {
        let mut jobs = Vec::new();
        {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(j) => jobs.push(j),
                None => return,
            }
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
        }
        let all: Vec<NewEvent> = jobs.iter().flat_map(|j| j.events.iter().cloned()).collect();
        debug!(
            requests = jobs.len(),
            events = all.len(),
            "recording a batch of events"
        );
        match event::insert_events(&pool, &all).await {
            Ok(inserted) => {
                let mut new_keys: std::collections::HashSet<String> =
                    inserted.into_iter().flatten().collect();
                for job in jobs {
                    // A key recorded in this batch counts for the first request that had it.
                    let n = job
                        .events
                        .iter()
                        .filter(|e| match &e.dedup_key {
                            Some(k) => new_keys.remove(k),
                            None => true,
                        })
                        .count() as u64;
                    let _ = job.reply.send(Ok(n));
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}
