//! LISTEN on the events channel. A notification is only a hint that wakes the workers; when
//! the connection drops it is re-established with capped backoff and the workers are woken
//! right after (a poll catches whatever was sent while nobody listened).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::db::CHANNEL;

pub async fn run(
    pool: PgPool,
    wake: Arc<Notify>,
    connected: Arc<AtomicBool>,
    cancel: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    let max_delay = Duration::from_secs(5);
    let mut first = true;
    loop {
        if cancel.is_cancelled() {
            break;
        }
        let listener = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener => match r {
                Ok(l) => l,
                Err(e) => {
                    connected.store(false, Ordering::SeqCst);
                    warn!(error = %e, retry_in = ?delay, "cannot LISTEN; workers keep polling meanwhile");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(max_delay);
                    continue;
                }
            }
        };
        connected.store(true, Ordering::SeqCst);
        delay = Duration::from_millis(100);
        if first {
            debug!("listening for change notifications");
            first = false;
        } else {
            info!("LISTEN connection re-established; polling for anything missed");
        }
        // Poll right away: notifications sent while we were not listening are lost.
        wake.notify_one();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    connected.store(false, Ordering::SeqCst);
                    return;
                }
                n = listener.try_recv() => match n {
                    Ok(Some(_)) => wake.notify_one(),
                    Ok(None) => {
                        warn!("LISTEN connection lost; reconnecting");
                        break;
                    }
                    Err(e) => {
                        warn!(error = %e, "LISTEN connection failed; reconnecting");
                        break;
                    }
                }
            }
        }
        connected.store(false, Ordering::SeqCst);
        wake.notify_one();
    }
    connected.store(false, Ordering::SeqCst);
}
