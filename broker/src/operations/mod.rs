//! Running operations: workers claim due operations through the state store, run them
//! against the infrastructure while renewing their lease, and record the outcome.
//!
//! Any broker replica can run any operation. A failed attempt is retried with
//! exponential backoff up to the operation's attempt limit (at once for an error that
//! no retry can cure, such as a refused argument), then the operation fails
//! with a description that tells the user what happened (the cause goes to the log,
//! never to the description). A broker killed mid-operation leaves a lease that expires;
//! the next claim runs the operation again (every engine call is idempotent) or, when
//! its attempts are used up, fails it. Nothing stays `in progress` forever.

pub mod execute;
pub mod supervisor;

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::app_state::AppState;
use crate::error::{Error, cause_chain};
use crate::store::operations::{self as ops, Operation};
use crate::store::{ms, write_transaction};
use execute::{Effect, apply_failure, apply_success};

/// Operations one broker runs at the same time.
const WORKERS: usize = 4;

/// Longest one attempt may run: a hung engine call fails the attempt instead of keeping
/// its operation `in progress` (with a renewed lease) forever.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest an attempt that moves a database's data may run (a backup, a restore, a
/// provision that clones or forks): long enough for a large database, still bounded.
const DATA_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(12 * 3600);

fn attempt_timeout(operation: &Operation) -> Duration {
    let seeded = || {
        serde_json::from_str::<crate::backups::run::ProvisionPayload>(&operation.payload)
            .is_ok_and(|p| p.seed.is_some())
    };
    match operation.kind.as_str() {
        ops::kind::BACKUP | ops::kind::RESTORE => DATA_ATTEMPT_TIMEOUT,
        ops::kind::PROVISION if seeded() => DATA_ATTEMPT_TIMEOUT,
        _ => ATTEMPT_TIMEOUT,
    }
}

/// First retry delay; doubled per attempt, at most [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Starts the workers; they stop claiming when `cancel` fires.
pub fn spawn_workers(state: &AppState, cancel: &CancellationToken) -> Vec<JoinHandle<()>> {
    (0..WORKERS)
        .map(|n| tokio::spawn(work(state.clone(), cancel.clone(), n)))
        .collect()
}

/// On PostgreSQL: listens for new operations of every replica and wakes the workers.
/// Reconnects after a failure; polling covers the gaps.
pub fn spawn_listener(state: &AppState, url: String, cancel: &CancellationToken) -> JoinHandle<()> {
    let (state, cancel) = (state.clone(), cancel.clone());
    tokio::spawn(async move {
        while !cancel.is_cancelled() {
            if let Err(error) = listen(&state, &url, &cancel).await {
                tracing::warn!(%error, "Listening for new operations failed; polling until it is back.");
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    })
}

async fn listen(
    state: &AppState,
    url: &str,
    cancel: &CancellationToken,
) -> Result<(), tokio_postgres::Error> {
    use futures::StreamExt as _;

    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN {}", ops::CHANNEL);
    let subscribe = client.batch_execute(&statement);
    tokio::pin!(subscribe);
    let mut subscribed = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            result = &mut subscribe, if !subscribed => {
                result?;
                subscribed = true;
            }
            message = messages.next() => match message {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => state.wake.notify_waiters(),
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error),
                None => return Ok(()),
            },
        }
    }
}

async fn work(state: AppState, cancel: CancellationToken, worker: usize) {
    let lease = ms(state.settings.operation_lease);
    while !cancel.is_cancelled() {
        let token = format!("{}/{}", state.worker_id, uuid::Uuid::new_v4());
        let claimed = state
            .store
            .run(move |conn| Ok(ops::claim(conn, &token, lease)?))
            .await;
        match claimed {
            Ok(Some(operation)) => {
                tracing::info!(
                    worker,
                    operation = %operation.id,
                    kind = %operation.kind,
                    instance_id = %operation.instance_id,
                    attempt = operation.attempts,
                    "Claimed an operation."
                );
                // Its own task: a panic ends that attempt (the lease expires and the
                // operation is taken up again), never this worker. Aborting the worker
                // (shutdown) aborts the attempt with it.
                let (id, attempt_state) = (operation.id.clone(), state.clone());
                let attempt = AbortOnDropHandle::new(tokio::spawn(async move {
                    run_claimed(&attempt_state, operation).await
                }));
                match attempt.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => {
                        tracing::error!(worker, operation = %id, error = %cause_chain(&error), "Running an operation failed.");
                    }
                    Err(error) => {
                        tracing::error!(worker, operation = %id, %error, "An operation attempt panicked; it is retried when its lease expires.");
                    }
                }
                continue;
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(worker, error = %cause_chain(&error), "Claiming an operation failed.");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = state.wake.notified() => {}
            () = tokio::time::sleep(state.settings.worker_poll) => {}
        }
    }
}

/// Runs an operation whose lease this process holds, to success, a retry later, or
/// failure. Returns true when the operation succeeded now.
///
/// # Errors
/// When the outcome could not be recorded (the lease expires and another worker will
/// take the operation over).
pub async fn run_claimed(state: &AppState, operation: Operation) -> Result<bool, Error> {
    let token = operation
        .lease_owner
        .clone()
        .ok_or_else(|| Error::Inconsistent(format!("operation {} is not claimed", operation.id)))?;
    if operation.attempts > operation.max_attempts {
        let description = format!(
            "The {} did not finish: the broker was interrupted {} times (operation {}).",
            operation.kind, operation.max_attempts, operation.id
        );
        tracing::error!(operation = %operation.id, "Giving up on an operation that was interrupted too often.");
        return record_failure(state, &operation, &token, description)
            .await
            .map(|()| false);
    }
    let _running = state.running.track(&operation.id, &token);
    // Renewal runs inside this future, never detached: when the attempt ends, is
    // dropped (a cancelled inline request) or panics, the lease stops being extended.
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(attempt_timeout(&operation), execute::execute(state, &operation)) => {
            Some(outcome.unwrap_or_else(|_| {
                Err(Error::Adapters(phoenix_adapters::Error::Timeout {
                    what: format!("the {} attempt", operation.kind),
                    after: attempt_timeout(&operation),
                }))
            }))
        }
        () = keep_lease(state, &operation.id, &token) => None,
    };
    let Some(outcome) = outcome else {
        tracing::warn!(operation = %operation.id, "Lost the lease of an operation; another worker owns it now.");
        return Ok(false);
    };
    match outcome {
        Ok(effect) => record_success(state, &operation, &token, effect).await,
        Err(error) => {
            tracing::error!(
                operation = %operation.id,
                kind = %operation.kind,
                instance_id = %operation.instance_id,
                attempt = operation.attempts,
                error = %cause_chain(&error),
                "An operation attempt failed."
            );
            if operation.attempts < operation.max_attempts && !error.is_permanent() {
                let exponent = u32::try_from(operation.attempts.saturating_sub(1))
                    .unwrap_or(0)
                    .min(16);
                let delay = BASE_BACKOFF
                    .saturating_mul(2u32.saturating_pow(exponent))
                    .min(MAX_BACKOFF);
                let delay_ms = ms(delay);
                let description = format!(
                    "Attempt {} of {} failed; trying again.",
                    operation.attempts, operation.max_attempts
                );
                let id = operation.id.clone();
                state
                    .store
                    .run(move |conn| {
                        Ok(ops::reschedule(conn, &id, &token, delay_ms, &description)?)
                    })
                    .await?;
                Ok(false)
            } else {
                let description = match error.user_summary() {
                    Some(summary) => format!(
                        "The {} failed (operation {}): {summary}",
                        operation.kind, operation.id
                    ),
                    None => format!(
                        "The {} failed (operation {}); the broker's logs say why.",
                        operation.kind, operation.id
                    ),
                };
                record_failure(state, &operation, &token, description)
                    .await
                    .map(|()| false)
            }
        }
    }
}

/// Hands back the leases of the operations this process was running, so that the next
/// broker (or another replica) takes them over at once instead of after the lease. The
/// interrupted attempt still counts.
pub async fn release_leases(state: &AppState, running: Vec<(String, String)>) {
    for (id, token) in running {
        let description = "The broker stopped during this operation; it resumes shortly.";
        let (op_id, op_token) = (id.clone(), token);
        let released = state
            .store
            .run(move |conn| Ok(ops::reschedule(conn, &op_id, &op_token, 0, description)?))
            .await;
        match released {
            Ok(true) => {
                tracing::info!(operation = %id, "Handed back the lease of an interrupted operation.")
            }
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(operation = %id, error = %cause_chain(&error), "Handing back a lease failed; it expires on its own.")
            }
        }
    }
}

/// Renews the lease of an operation while the attempt runs; returns when the lease is
/// lost: taken over by another worker, or not renewed for so long that it may have
/// expired (the database unreachable), so that another replica may have claimed it.
async fn keep_lease(state: &AppState, id: &str, token: &str) {
    let lease = state.settings.operation_lease;
    let every = lease / 4;
    // The claim happened just before the attempt began: that is the first renewal.
    let mut renewed_at = Instant::now();
    loop {
        // Stop a quarter of a lease before it may run out: time for the work in flight
        // to notice the cancellation before another replica's claim.
        let give_up_at = renewed_at + lease.saturating_sub(lease / 4);
        let next = (Instant::now() + every).min(give_up_at);
        tokio::time::sleep_until(next).await;
        if Instant::now() >= give_up_at {
            tracing::warn!(operation = %id, "Could not renew an operation lease in time; giving the attempt up.");
            return;
        }
        let sent = Instant::now();
        let (op_id, op_token) = (id.to_owned(), token.to_owned());
        let renewal = state
            .store
            .run(move |conn| Ok(ops::renew(conn, &op_id, &op_token, ms(lease))?));
        match tokio::time::timeout_at(give_up_at, renewal).await {
            Ok(Ok(true)) => renewed_at = sent,
            Ok(Ok(false)) => return,
            Ok(Err(error)) => {
                tracing::warn!(operation = %id, error = %cause_chain(&error), "Renewing an operation lease failed.");
            }
            Err(_) => {}
        }
    }
}

async fn record_success(
    state: &AppState,
    operation: &Operation,
    token: &str,
    effect: Effect,
) -> Result<bool, Error> {
    let (id, token, kind) = (
        operation.id.clone(),
        token.to_owned(),
        operation.kind.clone(),
    );
    let operation_for_store = operation.clone();
    let recorded = state
        .store
        .run(move |conn| {
            write_transaction(conn, |conn| {
                if !ops::finish(
                    conn,
                    &id,
                    &token,
                    ops::state::SUCCEEDED,
                    effect.description(),
                )? {
                    return Ok(false);
                }
                apply_success(conn, &operation_for_store, effect)?;
                Ok::<_, Error>(true)
            })
        })
        .await?;
    if recorded {
        metrics::counter!("phoenix_operations_total", "kind" => kind, "state" => "succeeded")
            .increment(1);
        tracing::info!(operation = %operation.id, kind = %operation.kind, instance_id = %operation.instance_id, "Operation succeeded.");
        if operation.kind == ops::kind::BACKUP {
            // A new backup may let an old one go; the scheduler would get there too.
            if let Err(error) =
                crate::backups::scheduler::apply_retention(state, &operation.instance_id).await
            {
                tracing::warn!(instance_id = %operation.instance_id, error = %cause_chain(&error), "Applying retention after a backup failed; the scheduler retries.");
            }
        }
    } else {
        tracing::warn!(operation = %operation.id, "Lost the lease before recording success.");
    }
    Ok(recorded)
}

async fn record_failure(
    state: &AppState,
    operation: &Operation,
    token: &str,
    description: String,
) -> Result<(), Error> {
    let (id, token, kind) = (
        operation.id.clone(),
        token.to_owned(),
        operation.kind.clone(),
    );
    let operation_for_store = operation.clone();
    let recorded = state
        .store
        .run(move |conn| {
            write_transaction(conn, |conn| {
                if !ops::finish(conn, &id, &token, ops::state::FAILED, &description)? {
                    return Ok(false);
                }
                apply_failure(conn, &operation_for_store, &description)?;
                Ok::<_, Error>(true)
            })
        })
        .await?;
    if recorded {
        metrics::counter!("phoenix_operations_total", "kind" => kind, "state" => "failed")
            .increment(1);
        tracing::warn!(operation = %operation.id, kind = %operation.kind, instance_id = %operation.instance_id, "Operation failed.");
        // Only after the fenced finish: a worker that lost its lease must not wipe what
        // the worker that took the operation over has just provisioned.
        execute::clean_up_after_failure(state, operation).await;
    } else {
        tracing::warn!(operation = %operation.id, "Lost the lease before recording failure.");
    }
    Ok(())
}
