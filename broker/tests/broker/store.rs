//! The state store on SQLite and PostgreSQL: the same tests, both backends.

use phoenix_broker::store::backups::{self, Backup, state as backup_state, trigger};
use phoenix_broker::store::instances::{self, Instance, state as instance_state};
use phoenix_broker::store::operations::{self as ops, NewOperation, kind, state};
use phoenix_broker::store::policies::{self, PolicyRow};
use phoenix_broker::store::tokens;
use phoenix_broker::store::{DbConnection, Store, is_unique_violation, now_ms};

use crate::support::{Backend, TestDb};

/// Runs each listed test on both backends.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name(crate::support::Backend::Sqlite).await;
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $name() {
                super::$name(crate::support::Backend::Postgres).await;
            })*
        }
    };
}

on_both_backends!(
    migrations_apply_once_and_a_second_open_finds_nothing_to_do,
    an_operation_is_claimed_by_exactly_one_worker,
    an_expired_lease_hands_the_operation_to_another_worker_and_fences_the_first,
    a_second_running_operation_on_an_instance_is_refused,
    a_rescheduled_operation_waits_for_its_time,
    ports_are_unique_among_live_instances_and_freed_by_deletion,
    concurrent_claims_never_run_an_operation_twice,
    one_due_time_starts_one_scheduled_backup_across_replicas,
    the_first_stored_backup_key_wins,
    a_backup_being_deleted_is_hidden_and_only_finished_backups_can_be,
    tokens_open_their_instance_until_revoked,
);

fn instance(id: &str, port: Option<i32>) -> Instance {
    Instance {
        id: id.to_owned(),
        service_id: "s".into(),
        plan_id: "p".into(),
        state: instance_state::PROVISIONING.into(),
        parameters: "{}".into(),
        context: "{}".into(),
        organization_guid: Some("o".into()),
        space_guid: Some("s".into()),
        maintenance_version: None,
        engine: "postgresql".into(),
        engine_version: "15".into(),
        settings: "{}".into(),
        port,
        host: None,
        database_name: None,
        created_at: now_ms(),
        updated_at: now_ms(),
    }
}

fn provision(id: &str) -> NewOperation {
    NewOperation::new(kind::PROVISION, id, None, "{}".into(), "Provisioning.", 3)
}

async fn with_conn<T: Send + 'static>(
    store: &Store,
    work: impl FnOnce(&mut DbConnection) -> T + Send + 'static,
) -> T {
    store.run(move |conn| Ok(work(conn))).await.unwrap()
}

async fn seeded(backend: Backend, ids: &[&str]) -> (TestDb, Store) {
    let db = TestDb::new(backend);
    let store = db.open();
    let ids: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
    with_conn(&store, move |conn| {
        for (n, id) in ids.iter().enumerate() {
            instances::insert(conn, &instance(id, Some(20000 + i32::try_from(n).unwrap())))
                .unwrap();
            ops::insert(conn, &provision(id)).unwrap();
        }
    })
    .await;
    (db, store)
}

async fn migrations_apply_once_and_a_second_open_finds_nothing_to_do(backend: Backend) {
    let db = TestDb::new(backend);
    let first = db.open();
    assert!(first.is_reachable().await);
    let second = db.open();
    assert!(second.is_reachable().await);
    assert_eq!(second.is_postgres(), matches!(backend, Backend::Postgres));
}

async fn an_operation_is_claimed_by_exactly_one_worker(backend: Backend) {
    let (_db, store) = seeded(backend, &["i1"]).await;
    let claimed = with_conn(&store, |conn| ops::claim(conn, "worker-a", 60_000).unwrap()).await;
    let claimed = claimed.expect("the due operation is claimed");
    assert_eq!(claimed.attempts, 1);
    assert_eq!(claimed.lease_owner.as_deref(), Some("worker-a"));
    let again = with_conn(&store, |conn| ops::claim(conn, "worker-b", 60_000).unwrap()).await;
    assert!(
        again.is_none(),
        "a leased operation must not be claimed twice"
    );
}

async fn an_expired_lease_hands_the_operation_to_another_worker_and_fences_the_first(
    backend: Backend,
) {
    let (_db, store) = seeded(backend, &["i1"]).await;
    // A lease that is already over: the first worker "died" holding it.
    let first = with_conn(&store, |conn| ops::claim(conn, "dead-worker", -1).unwrap())
        .await
        .unwrap();
    let second = with_conn(&store, |conn| {
        ops::claim(conn, "live-worker", 60_000).unwrap()
    })
    .await
    .expect("an expired lease lets another worker take the operation");
    assert_eq!(second.id, first.id);
    assert_eq!(second.attempts, 2);
    let id = first.id.clone();
    let (renewed, finished) = with_conn(&store, move |conn| {
        (
            ops::renew(conn, &id, "dead-worker", 60_000).unwrap(),
            ops::finish(conn, &id, "dead-worker", state::SUCCEEDED, "done").unwrap(),
        )
    })
    .await;
    assert!(!renewed && !finished, "the old lease holder is fenced off");
    let id = first.id.clone();
    let finished = with_conn(&store, move |conn| {
        ops::finish(conn, &id, "live-worker", state::SUCCEEDED, "done").unwrap()
    })
    .await;
    assert!(finished);
    let id = first.id.clone();
    let stored = with_conn(&store, move |conn| ops::find(conn, &id).unwrap().unwrap()).await;
    assert_eq!(stored.state, state::SUCCEEDED);
    assert!(stored.lease_owner.is_none());
}

async fn a_second_running_operation_on_an_instance_is_refused(backend: Backend) {
    let (_db, store) = seeded(backend, &["i1"]).await;
    let refused = with_conn(&store, |conn| {
        let update = NewOperation::new(kind::UPDATE, "i1", None, "{}".into(), "Updating.", 3);
        ops::insert(conn, &update).unwrap_err()
    })
    .await;
    assert!(is_unique_violation(&refused), "{refused:?}");
    // Binding operations are limited per binding, not per instance.
    with_conn(&store, |conn| {
        let bind_a = NewOperation::new(kind::BIND, "i1", Some("a"), "{}".into(), "Binding.", 3);
        let bind_b = NewOperation::new(kind::BIND, "i1", Some("b"), "{}".into(), "Binding.", 3);
        ops::insert(conn, &bind_a).unwrap();
        ops::insert(conn, &bind_b).unwrap();
        let bind_a_again =
            NewOperation::new(kind::UNBIND, "i1", Some("a"), "{}".into(), "Unbinding.", 3);
        assert!(is_unique_violation(
            &ops::insert(conn, &bind_a_again).unwrap_err()
        ));
    })
    .await;
}

async fn a_rescheduled_operation_waits_for_its_time(backend: Backend) {
    let (_db, store) = seeded(backend, &["i1"]).await;
    let claimed = with_conn(&store, |conn| ops::claim(conn, "w", 60_000).unwrap())
        .await
        .unwrap();
    let id = claimed.id.clone();
    let an_hour = 3_600_000;
    let rescheduled = with_conn(&store, move |conn| {
        ops::reschedule(conn, &id, "w", an_hour, "Attempt 1 failed; trying again.").unwrap()
    })
    .await;
    assert!(rescheduled);
    let next = with_conn(&store, |conn| ops::claim(conn, "w2", 60_000).unwrap()).await;
    assert!(
        next.is_none(),
        "a rescheduled operation is not due before its time"
    );
    let latest = with_conn(&store, |conn| {
        ops::latest_for_instance(conn, "i1").unwrap().unwrap()
    })
    .await;
    assert_eq!(latest.state, state::IN_PROGRESS);
    assert_eq!(
        latest.description.as_deref(),
        Some("Attempt 1 failed; trying again.")
    );
}

async fn ports_are_unique_among_live_instances_and_freed_by_deletion(backend: Backend) {
    let (_db, store) = seeded(backend, &["i1"]).await;
    with_conn(&store, |conn| {
        let clash = instances::insert(conn, &instance("i2", Some(20000))).unwrap_err();
        assert!(is_unique_violation(&clash));
        instances::mark_deleted(conn, "i1").unwrap();
        assert!(instances::used_ports(conn).unwrap().is_empty());
        instances::insert(conn, &instance("i2", Some(20000))).unwrap();
        assert_eq!(instances::used_ports(conn).unwrap(), vec![20000]);
    })
    .await;
}

async fn concurrent_claims_never_run_an_operation_twice(backend: Backend) {
    let ids: Vec<String> = (0..12).map(|n| format!("i{n}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (_db, store) = seeded(backend, &refs).await;
    let mut workers = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let token = format!("w{w}");
                let claimed = store
                    .run(move |conn| Ok(ops::claim(conn, &token, 60_000)?))
                    .await
                    .unwrap();
                match claimed {
                    Some(op) => mine.push(op.id),
                    None => break,
                }
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.unwrap());
    }
    let claimed = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), claimed, "an operation was claimed twice");
    // A claim can lose a race and return None early; whatever is left is still due.
    let left = with_conn(&store, |conn| {
        let mut n = 0;
        while ops::claim(conn, "sweeper", 60_000).unwrap().is_some() {
            n += 1;
        }
        n
    })
    .await;
    assert_eq!(claimed + left, 12);
}

#[test]
fn replicas_opening_together_on_postgres_migrate_one_at_a_time() {
    let db = TestDb::new(Backend::Postgres);
    let opened: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| Store::open(&db.url).map(drop)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for result in opened {
        result.expect("every replica opens the store");
    }
}

/// A decision holding an instance's lock makes a second decision on it wait until the
/// first has committed, so the second sees what the first did.
#[test]
fn a_locked_instance_makes_a_concurrent_decision_wait_on_postgres() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Barrier};

    use phoenix_broker::store::write_transaction;

    let db = TestDb::new(Backend::Postgres);
    let url = db.url.clone();
    let store = Store::open(&url).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(with_conn(&store, |conn| {
        instances::insert(conn, &instance("i1", Some(20000))).unwrap();
    }));
    let committed = Arc::new(AtomicBool::new(false));
    let locked = Arc::new(Barrier::new(2));
    let first = {
        let (url, committed, locked) = (url.clone(), committed.clone(), locked.clone());
        std::thread::spawn(move || {
            let mut conn = url.connect().unwrap();
            write_transaction(&mut conn, |conn| {
                instances::lock(conn, "i1")?;
                locked.wait();
                std::thread::sleep(std::time::Duration::from_millis(300));
                committed.store(true, Ordering::SeqCst);
                Ok::<_, diesel::result::Error>(())
            })
            .unwrap();
        })
    };
    locked.wait();
    let mut conn = url.connect().unwrap();
    let saw_commit = write_transaction(&mut conn, |conn| {
        instances::lock(conn, "i1")?;
        Ok::<_, diesel::result::Error>(committed.load(Ordering::SeqCst))
    })
    .unwrap();
    first.join().unwrap();
    assert!(saw_commit, "the second decision did not wait for the first");
}

async fn one_due_time_starts_one_scheduled_backup_across_replicas(backend: Backend) {
    let (_db, store) = seeded(backend, &["i1"]).await;
    let due_at = now_ms() - 1000;
    with_conn(&store, move |conn| {
        policies::upsert(
            conn,
            &PolicyRow {
                instance_id: "i1".into(),
                schedule: Some("0 3 * * *".into()),
                keep_last: Some(7),
                max_age_days: None,
                next_run_at: Some(due_at),
                updated_at: 0,
            },
        )
        .unwrap();
        let due = policies::due(conn, now_ms()).unwrap();
        assert_eq!(due.len(), 1);
        // Two replicas read the same due time; only the first one moves it.
        assert!(policies::advance(conn, "i1", due_at, Some(due_at + 86_400_000)).unwrap());
        assert!(!policies::advance(conn, "i1", due_at, Some(due_at + 86_400_000)).unwrap());
        assert!(policies::due(conn, now_ms()).unwrap().is_empty());
        let stored = policies::find(conn, "i1").unwrap().unwrap();
        assert_eq!(stored.keep_last, Some(7));
        assert_eq!(stored.next_run_at, Some(due_at + 86_400_000));
    })
    .await;
}

async fn the_first_stored_backup_key_wins(backend: Backend) {
    let (_db, store) = seeded(backend, &["i1"]).await;
    with_conn(&store, |conn| {
        assert_eq!(instances::backup_key(conn, "i1").unwrap(), None);
        let first = instances::set_backup_key_if_absent(conn, "i1", b"first").unwrap();
        let second = instances::set_backup_key_if_absent(conn, "i1", b"second").unwrap();
        assert_eq!(first, b"first");
        assert_eq!(second, b"first");
    })
    .await;
}

async fn a_backup_being_deleted_is_hidden_and_only_finished_backups_can_be(backend: Backend) {
    let (_db, store) = seeded(backend, &["i1"]).await;
    with_conn(&store, |conn| {
        let running = Backup::new("i1", "op-1", trigger::MANUAL);
        backups::insert(conn, &running).unwrap();
        assert!(!backups::mark_deleting(conn, &running.id).unwrap());
        backups::mark_failed(conn, &running.id, "it broke").unwrap();
        let failed = backups::find(conn, "i1", &running.id).unwrap().unwrap();
        assert_eq!(failed.state, backup_state::FAILED);
        assert_eq!(failed.error.as_deref(), Some("it broke"));
        assert!(backups::mark_deleting(conn, &running.id).unwrap());
        assert!(backups::find(conn, "i1", &running.id).unwrap().is_none());
        assert!(backups::list(conn, "i1").unwrap().is_empty());
        assert_eq!(backups::list_deleting(conn).unwrap().len(), 1);
        backups::delete(conn, &running.id).unwrap();
        assert!(backups::list_deleting(conn).unwrap().is_empty());
        assert!(backups::find(conn, "other", &running.id).unwrap().is_none());
    })
    .await;
}

async fn tokens_open_their_instance_until_revoked(backend: Backend) {
    let (_db, store) = seeded(backend, &["i1", "i2"]).await;
    with_conn(&store, |conn| {
        tokens::insert(conn, "digest-a", "i1", "b-a").unwrap();
        tokens::insert(conn, "digest-b", "i2", "b-b").unwrap();
        assert_eq!(
            tokens::instance_of(conn, "digest-a").unwrap().as_deref(),
            Some("i1")
        );
        // A repeated bind attempt replaces the binding's token.
        tokens::insert(conn, "digest-a2", "i1", "b-a").unwrap();
        assert_eq!(tokens::instance_of(conn, "digest-a").unwrap(), None);
        tokens::delete_for_binding(conn, "b-a").unwrap();
        assert_eq!(tokens::instance_of(conn, "digest-a2").unwrap(), None);
        tokens::delete_for_instance(conn, "i2").unwrap();
        assert_eq!(tokens::instance_of(conn, "digest-b").unwrap(), None);
    })
    .await;
}
