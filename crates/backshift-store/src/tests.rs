use super::*;
use backshift_core::Limits;
use backshift_protocol::format_ts;

/// Every test here runs twice: on SQLite and on PostgreSQL.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = super::Store::open_sqlite(&dir.path().join("db.sqlite"))
                        .await
                        .unwrap();
                    assert_eq!(store.backend(), super::Backend::Sqlite);
                    super::$name(store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let db = testkit::PgDatabase::create().await.unwrap();
                    let store = super::Store::open(&db.url).await.unwrap();
                    assert_eq!(store.backend(), super::Backend::Postgres);
                    super::$name(store).await;
                }
            )*
        }
    };
}

async fn one_task(store: &Store) -> String {
    let project = store.project_for_source("/repo", "p1", 1).await.unwrap();
    store
        .create_task(
            &NewTask {
                origin: None,
                command: None,
                verify: Some("make test".into()),
                id: "aaaaaaaa".into(),
                project_id: project,
                prompt: "do it".into(),
                repo: "/repo".into(),
                base_ref: None,
                agent: "builtin".into(),
                limits: Limits::default(),
                created_at: 10,
            },
            &[NewAttempt {
                agent: None,
                id: "aaaaaaaa-1".into(),
                n: 1,
                branch: "backshift/aaaaaaaa-do-it".into(),
            }],
        )
        .await
        .unwrap();
    "aaaaaaaa-1".into()
}

fn event(attempt: &str, seq: u64, kind: EventKind) -> Event {
    Event {
        attempt_id: attempt.into(),
        driver: None,
        seq,
        ts: format_ts(0),
        kind,
    }
}

fn state_event(attempt: &str, seq: u64, from: AttemptState, to: AttemptState) -> Event {
    event(
        attempt,
        seq,
        EventKind::StateChanged {
            from: Some(from),
            to,
            reason: None,
            detail: None,
        },
    )
}

async fn a_created_task_reads_back_with_a_queued_attempt(store: Store) {
    let attempt = one_task(&store).await;
    let task = store.task("aaaaaaaa").await.unwrap().unwrap();
    assert_eq!(task.prompt, "do it");
    assert_eq!(task.verify.as_deref(), Some("make test"));
    assert_eq!(task.limits, Limits::default());
    let attempts = store.attempts_of("aaaaaaaa").await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].id, attempt);
    assert_eq!(attempts[0].state, AttemptState::Queued);
    assert_eq!(store.list_tasks(10).await.unwrap().len(), 1);
    assert!(store.task("bbbbbbbb").await.unwrap().is_none());
    // The winner: chosen automatically once, then only by a person.
    assert_eq!(task.winner, None);
    assert!(
        store
            .set_winner("aaaaaaaa", &attempt, "auto", true)
            .await
            .unwrap()
    );
    assert!(
        !store
            .set_winner("aaaaaaaa", "other", "auto", true)
            .await
            .unwrap()
    );
    assert!(
        store
            .set_winner("aaaaaaaa", "aaaaaaaa-2", "alice", false)
            .await
            .unwrap()
    );
    let task = store.task("aaaaaaaa").await.unwrap().unwrap();
    assert_eq!(task.winner.as_deref(), Some("aaaaaaaa-2"));
    assert_eq!(task.winner_by.as_deref(), Some("alice"));
    assert_eq!(attempts[0].agent, None);
    // Chosen and not delivered: picked up after a restart until settled.
    assert_eq!(store.undelivered_tasks().await.unwrap().len(), 1);
    store
        .set_delivery("aaaaaaaa", r#"{"state":"pushing"}"#)
        .await
        .unwrap();
    assert_eq!(store.undelivered_tasks().await.unwrap().len(), 1);
    store
        .set_delivery("aaaaaaaa", r#"{"state":"opened"}"#)
        .await
        .unwrap();
    assert!(store.undelivered_tasks().await.unwrap().is_empty());
    // Webhook deliveries are taken once; a task without an origin has
    // nothing to report.
    assert!(store.first_delivery("github", "d-1", 1).await.unwrap());
    assert!(!store.first_delivery("github", "d-1", 2).await.unwrap());
    assert!(store.first_delivery("generic", "d-1", 2).await.unwrap());
    assert!(!store.claim_report("aaaaaaaa", 3).await.unwrap());
}

async fn projects_are_one_per_source(store: Store) {
    let a = store.project_for_source("/repo", "p1", 1).await.unwrap();
    let b = store.project_for_source("/repo", "p2", 2).await.unwrap();
    let c = store.project_for_source("/other", "p3", 3).await.unwrap();
    assert_eq!((a.as_str(), b.as_str(), c.as_str()), ("p1", "p1", "p3"));
}

async fn transitions_are_compare_and_set_and_carry_their_event(store: Store) {
    let attempt = one_task(&store).await;
    let change = StateChange {
        attempt_id: &attempt,
        from: AttemptState::Queued,
        to: AttemptState::Provisioning,
        reason: None,
        detail: None,
    };
    let ev = state_event(
        &attempt,
        1,
        AttemptState::Queued,
        AttemptState::Provisioning,
    );
    assert!(store.record_transition(&change, &ev, 20).await.unwrap());
    // The same change again finds the attempt no longer queued: refused,
    // and no second event is written.
    let ev2 = state_event(
        &attempt,
        2,
        AttemptState::Queued,
        AttemptState::Provisioning,
    );
    assert!(!store.record_transition(&change, &ev2, 21).await.unwrap());
    assert_eq!(store.last_seq(&attempt).await.unwrap(), 1);
    let row = store.attempt(&attempt).await.unwrap().unwrap();
    assert_eq!(row.state, AttemptState::Provisioning);
    assert_eq!(row.updated_at, 20);

    let fail = StateChange {
        attempt_id: &attempt,
        from: AttemptState::Provisioning,
        to: AttemptState::Failed,
        reason: Some(FailureReason::ImageMissing),
        detail: Some("run backshift image bootstrap".into()),
    };
    let ev3 = state_event(
        &attempt,
        2,
        AttemptState::Provisioning,
        AttemptState::Failed,
    );
    assert!(store.record_transition(&fail, &ev3, 22).await.unwrap());
    let row = store.attempt(&attempt).await.unwrap().unwrap();
    assert_eq!(row.reason, Some(FailureReason::ImageMissing));
    assert_eq!(row.detail.as_deref(), Some("run backshift image bootstrap"));
    let failed = store
        .attempts_in_states(&[AttemptState::Failed])
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
}

async fn events_are_idempotent_on_seq_and_read_in_order(store: Store) {
    let attempt = one_task(&store).await;
    for seq in [2, 1, 3] {
        let e = event(
            &attempt,
            seq,
            EventKind::Progress {
                message: format!("m{seq}"),
            },
        );
        store.append_event(&e, 30).await.unwrap();
    }
    // A replayed seq keeps the first body.
    let dup = event(
        &attempt,
        2,
        EventKind::Progress {
            message: "other".into(),
        },
    );
    store.append_event(&dup, 31).await.unwrap();
    let all = store.events_after(&attempt, 0, 100).await.unwrap();
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(
        all[1].kind,
        EventKind::Progress {
            message: "m2".into()
        }
    );
    let later = store.events_after(&attempt, 1, 1).await.unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].seq, 2);
    assert_eq!(store.last_seq(&attempt).await.unwrap(), 3);
}

async fn tokens_are_found_by_hash_only(store: Store) {
    assert_eq!(store.token_count().await.unwrap(), 0);
    store.insert_token("t1", "admin", "abc", 1).await.unwrap();
    assert_eq!(
        store.token_by_hash("abc").await.unwrap().as_deref(),
        Some("admin")
    );
    assert_eq!(store.token_by_hash("abd").await.unwrap(), None);
    store.insert_token("t2", "ci", "def", 2).await.unwrap();
    assert_eq!(
        store.list_tokens().await.unwrap(),
        [("admin".to_owned(), 1), ("ci".to_owned(), 2)]
    );
    assert_eq!(store.delete_token("ci").await.unwrap(), 1);
    assert_eq!(store.token_by_hash("def").await.unwrap(), None);
    assert_eq!(store.delete_token("ci").await.unwrap(), 0);
    assert_eq!(store.meta_init("instance", "x").await.unwrap(), "x");
    assert_eq!(store.meta_init("instance", "y").await.unwrap(), "x");
}

async fn checkpoints_carry_the_conversation_and_a_resume_overwrites_its_tail(store: Store) {
    let attempt = one_task(&store).await;
    assert_eq!(store.latest_checkpoint(&attempt).await.unwrap(), None);
    let cp = |n: u32, messages: u32| CheckpointRow {
        attempt_id: attempt.clone(),
        n,
        seq: u64::from(n) * 10,
        turn: n,
        messages,
        commit_sha: format!("{n:040}"),
        created_at: 1,
    };
    let m = |s: &str| s.to_owned();
    store
        .record_checkpoint(&cp(1, 3), 0, &[m("sys"), m("user"), m("a1")], true)
        .await
        .unwrap();
    store
        .record_checkpoint(&cp(2, 5), 3, &[m("t1"), m("a2")], true)
        .await
        .unwrap();
    assert_eq!(
        store.latest_checkpoint(&attempt).await.unwrap(),
        Some(cp(2, 5))
    );
    assert_eq!(
        store.messages(&attempt, 5).await.unwrap(),
        ["sys", "user", "a1", "t1", "a2"]
    );
    // Resumed from checkpoint 1, the conversation goes another way.
    store
        .record_checkpoint(&cp(3, 4), 3, &[m("note")], true)
        .await
        .unwrap();
    assert_eq!(
        store.messages(&attempt, 4).await.unwrap(),
        ["sys", "user", "a1", "note"]
    );
    // Asking for more than was stored is corruption, not a short answer.
    assert!(store.messages(&attempt, 9).await.is_err());
    // Checkpoint numbers are unique per attempt.
    assert!(
        store
            .record_checkpoint(&cp(3, 4), 4, &[], true)
            .await
            .is_err()
    );
}

async fn the_live_conversation_runs_ahead_of_checkpoints(store: Store) {
    let attempt = one_task(&store).await;
    assert!(store.live_messages(&attempt).await.unwrap().is_empty());
    let m = |s: &str| s.to_owned();
    store
        .save_messages(&attempt, 0, &[m("sys"), m("user"), m("calls")], 3)
        .await
        .unwrap();
    store
        .save_messages(&attempt, 3, &[m("result")], 4)
        .await
        .unwrap();
    assert_eq!(
        store.live_messages(&attempt).await.unwrap(),
        ["sys", "user", "calls", "result"]
    );
    // A mid-turn checkpoint leaves the live length alone; going back to a
    // checkpoint shortens it.
    let cp = CheckpointRow {
        attempt_id: attempt.clone(),
        n: 1,
        seq: 1,
        turn: 0,
        messages: 2,
        commit_sha: "0".repeat(40),
        created_at: 1,
    };
    store.record_checkpoint(&cp, 2, &[], false).await.unwrap();
    assert_eq!(store.live_messages(&attempt).await.unwrap().len(), 4);
    store.set_conversation_len(&attempt, 2).await.unwrap();
    assert_eq!(
        store.live_messages(&attempt).await.unwrap(),
        ["sys", "user"]
    );
    // Another iteration after a failed verification: the report is the
    // next message and the summary of the last finish is gone.
    store
        .update_attempt(
            &attempt,
            &AttemptUpdate {
                summary: Some("done"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    store
        .begin_iteration(&attempt, 2, Some("report"))
        .await
        .unwrap();
    assert_eq!(
        store.live_messages(&attempt).await.unwrap(),
        ["sys", "user", "report"]
    );
    assert_eq!(
        store.attempt(&attempt).await.unwrap().unwrap().summary,
        None
    );
    store.set_conversation_len(&attempt, 2).await.unwrap();
    // Events by kind, after a seq.
    let out = |seq, text: &str| {
        event(
            &attempt,
            seq,
            EventKind::CommandOutput {
                call_id: "c".into(),
                stream: backshift_protocol::OutputStream::Stdout,
                text: text.into(),
                journal_seq: Some(seq),
            },
        )
    };
    for e in [
        out(1, "a"),
        event(
            &attempt,
            2,
            EventKind::Progress {
                message: "p".into(),
            },
        ),
        out(3, "b"),
        out(4, "c"),
    ] {
        store.append_event(&e, 1).await.unwrap();
    }
    let found = store
        .events_of_kinds(&attempt, &["command_output", "tool_call"], 1)
        .await
        .unwrap();
    assert_eq!(found.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(
        store.last_seq_of_kind(&attempt, "progress").await.unwrap(),
        2
    );
    assert_eq!(
        store.last_seq_of_kind(&attempt, "tool_call").await.unwrap(),
        0
    );
}

async fn time_held_by_a_person_is_added_up_by_the_transitions_that_end_it(store: Store) {
    use AttemptState as S;
    let attempt = one_task(&store).await;
    let steps = [
        (S::Queued, S::Provisioning, 10),
        (S::Provisioning, S::Preparing, 20),
        (S::Preparing, S::Running, 30),
        (S::Running, S::WaitingApproval, 100),
        (S::WaitingApproval, S::Running, 400),
        (S::Running, S::Paused, 500),
        (S::Paused, S::Running, 1500),
        (S::Running, S::Publishing, 1600),
    ];
    for (i, (from, to, at)) in steps.into_iter().enumerate() {
        let change = StateChange {
            attempt_id: &attempt,
            from,
            to,
            reason: None,
            detail: None,
        };
        let ev = state_event(&attempt, i as u64 + 1, from, to);
        assert!(store.record_transition(&change, &ev, at).await.unwrap());
    }
    let row = store.attempt(&attempt).await.unwrap().unwrap();
    assert_eq!(
        row.held_ms,
        300 + 1000,
        "waiting 100..400, paused 500..1500"
    );
}

async fn pause_and_resume_requests_last_until_the_state_change_that_carries_them_out(store: Store) {
    use AttemptState as S;
    let attempt = one_task(&store).await;
    let mut seq = 0;
    let mut step = |from: S, to: S| {
        seq += 1;
        let store = &store;
        let attempt = attempt.clone();
        async move {
            let change = StateChange {
                attempt_id: &attempt,
                from,
                to,
                reason: None,
                detail: None,
            };
            let ev = state_event(&attempt, seq, from, to);
            assert!(store.record_transition(&change, &ev, 10).await.unwrap());
        }
    };
    step(S::Queued, S::Provisioning).await;
    step(S::Provisioning, S::Preparing).await;
    step(S::Preparing, S::Running).await;
    assert!(store.claim(&attempt, "r1", 0, 1000).await.unwrap());
    // Not paused: nothing to resume.
    assert!(!store.request_resume(&attempt, 20).await.unwrap());
    store.request_pause(&attempt, 20).await.unwrap();
    store.request_pause(&attempt, 30).await.unwrap();
    assert_eq!(
        store.pause_requests("r1").await.unwrap(),
        vec![attempt.clone()]
    );
    assert!(store.pause_requests("r2").await.unwrap().is_empty());
    let row = store.attempt(&attempt).await.unwrap().unwrap();
    assert_eq!(row.pause_requested, Some(20), "the first request stands");
    // A swing to a person and back does not carry it out.
    step(S::Running, S::WaitingApproval).await;
    step(S::WaitingApproval, S::Running).await;
    assert_eq!(store.pause_requests("r1").await.unwrap().len(), 1);
    step(S::Running, S::Paused).await;
    assert!(store.pause_requests("r1").await.unwrap().is_empty());
    assert!(store.request_resume(&attempt, 40).await.unwrap());
    let row = store.attempt(&attempt).await.unwrap().unwrap();
    assert_eq!(row.resume_requested, Some(40));
    step(S::Paused, S::Running).await;
    let row = store.attempt(&attempt).await.unwrap().unwrap();
    assert_eq!(row.resume_requested, None);
    // One that cannot be carried out is dropped; an end settles both.
    store.request_pause(&attempt, 50).await.unwrap();
    store.drop_pause_request(&attempt).await.unwrap();
    assert!(store.pause_requests("r1").await.unwrap().is_empty());
    store.request_pause(&attempt, 60).await.unwrap();
    step(S::Running, S::Cancelled).await;
    let row = store.attempt(&attempt).await.unwrap().unwrap();
    assert_eq!((row.pause_requested, row.resume_requested), (None, None));
}

async fn approvals_are_answered_once_and_grants_apply_to_their_task_or_project(store: Store) {
    let attempt = one_task(&store).await;
    let task = attempt.trim_end_matches("-1").to_owned();
    let pending = |id: &str, at: i64| ApprovalRow {
        id: id.into(),
        attempt_id: attempt.clone(),
        kind: "egress".into(),
        subject: r#"{"host":"pkg.invalid","port":443}"#.into(),
        summary: "CONNECT pkg.invalid:443".into(),
        state: "pending".into(),
        scope: None,
        answered_by: None,
        reason: None,
        created_at: at,
        expires_at: at + 300_000,
        answered_at: None,
    };
    store.insert_approval(&pending("ap1", 10)).await.unwrap();
    store.insert_approval(&pending("ap2", 20)).await.unwrap();
    let listed: Vec<String> = store
        .approvals(true, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(listed, ["ap2", "ap1"], "newest first");
    let approve = Answer {
        state: "approved",
        scope: Some("project"),
        by: "admin",
        reason: Some("needed"),
        at: 30,
    };
    let project = store.task(&task).await.unwrap().unwrap().project_id;
    let grant = NewGrant {
        id: "g1",
        project_id: &project,
        task_id: None,
        kind: "egress",
        target: "pkg.invalid:443",
    };
    assert!(
        store
            .answer_approval("ap1", &approve, Some(&grant))
            .await
            .unwrap()
    );
    // Answered once: a second answer changes nothing and leaves no grant.
    let deny = Answer {
        state: "denied",
        scope: None,
        by: "other",
        reason: None,
        at: 40,
    };
    assert!(!store.answer_approval("ap1", &deny, None).await.unwrap());
    let a = store.approval("ap1").await.unwrap().unwrap();
    assert_eq!(
        (
            a.state.as_str(),
            a.scope.as_deref(),
            a.answered_by.as_deref(),
            a.answered_at
        ),
        ("approved", Some("project"), Some("admin"), Some(30))
    );
    assert_eq!(store.approvals(true, 10).await.unwrap().len(), 1);
    assert_eq!(store.approvals(false, 10).await.unwrap().len(), 2);
    assert_eq!(store.approvals_of(&attempt).await.unwrap()[0].id, "ap1");
    assert_eq!(
        store
            .grant_for(&project, "another-task", "egress", "pkg.invalid:443")
            .await
            .unwrap()
            .as_deref(),
        Some("ap1"),
        "a project grant covers every task"
    );
    assert_eq!(
        store
            .grant_for(&project, &task, "egress", "pkg.invalid:80")
            .await
            .unwrap(),
        None
    );
    let task_grant = NewGrant {
        id: "g2",
        project_id: &project,
        task_id: Some(&task),
        kind: "egress",
        target: "other.invalid:443",
    };
    let approve_task = Answer {
        scope: Some("task"),
        ..approve
    };
    assert!(
        store
            .answer_approval("ap2", &approve_task, Some(&task_grant))
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .grant_for(&project, &task, "egress", "other.invalid:443")
            .await
            .unwrap()
            .as_deref(),
        Some("ap2")
    );
    assert_eq!(
        store
            .grant_for(&project, "another-task", "egress", "other.invalid:443")
            .await
            .unwrap(),
        None,
        "a task grant covers its task only"
    );
}

async fn the_audit_log_is_a_gapless_hash_chain_even_with_concurrent_writers(store: Store) {
    let mut writers = Vec::new();
    for i in 0..12 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let target = format!("t{i}");
            store
                .append_audit(&NewAudit {
                    ts: i,
                    actor: "token:admin",
                    action: "task.create",
                    target: &target,
                    detail: "{}",
                })
                .await
                .unwrap()
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let rows = store.audit_rows(0, 100).await.unwrap();
    assert_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    assert_eq!(rows[0].prev_hash, GENESIS);
    for pair in rows.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }
    assert!(rows.iter().all(|r| r.hash == r.expected_hash()));
    let mut edited = rows[3].clone();
    edited.actor = "token:someone-else".into();
    assert_ne!(edited.expected_hash(), edited.hash, "an edit shows");
    assert_eq!(store.audit_rows(10, 100).await.unwrap().len(), 2);
}

async fn secrets_are_stored_sealed_and_granted_per_project(store: Store) {
    let attempt = one_task(&store).await;
    let task = attempt.trim_end_matches("-1");
    let project = store.task(task).await.unwrap().unwrap().project_id;
    assert!(store.put_secret("DB", "sealed-1", "k1", 10).await.unwrap());
    assert!(
        !store.put_secret("DB", "sealed-2", "k1", 20).await.unwrap(),
        "replaced, not new"
    );
    let all = store.secrets().await.unwrap();
    assert_eq!(
        (all[0].sealed.as_str(), all[0].created_at, all[0].updated_at),
        ("sealed-2", 10, 20)
    );
    store
        .grant_secret("DB", &project, "DATABASE_PASSWORD", false, 30)
        .await
        .unwrap();
    store
        .grant_secret("DB", &project, "PGPASSWORD", true, 31)
        .await
        .unwrap();
    let grants = store.secret_grants(Some(&project)).await.unwrap();
    assert_eq!(grants.len(), 1, "one grant per secret and project");
    assert_eq!(grants[0].var, "PGPASSWORD");
    assert!(grants[0].setup_only);
    assert!(store.secret_grants(Some("other")).await.unwrap().is_empty());
    store.reseal_secret("DB", "sealed-3", "k2").await.unwrap();
    assert_eq!(store.secrets().await.unwrap()[0].key_id, "k2");
    assert!(store.revoke_secret("DB", &project).await.unwrap());
    assert!(!store.revoke_secret("DB", &project).await.unwrap());
    store
        .grant_secret("DB", &project, "PGPASSWORD", false, 32)
        .await
        .unwrap();
    assert!(store.delete_secret("DB").await.unwrap());
    assert!(
        store.secret_grants(None).await.unwrap().is_empty(),
        "grants go with it"
    );
    assert!(!store.delete_secret("DB").await.unwrap());
}

async fn secret_values_never_reach_the_tables(store: Store) {
    let attempt = one_task(&store).await;
    store
        .redactor()
        .set(vec![("TOKEN".into(), "s3cr3t-value".into())]);
    store
        .append_event(
            &event(
                &attempt,
                1,
                EventKind::Progress {
                    message: "got s3cr3t-value".into(),
                },
            ),
            1,
        )
        .await
        .unwrap();
    store
        .update_attempt(
            &attempt,
            &AttemptUpdate {
                summary: Some("printed s3cr3t-value"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    store
        .save_messages(
            &attempt,
            0,
            &[r#"{"content":"s3cr3t-value"}"#.to_owned()],
            1,
        )
        .await
        .unwrap();
    let evs = store.events_after(&attempt, 0, 10).await.unwrap();
    assert_eq!(
        evs[0].kind,
        EventKind::Progress {
            message: "got [redacted:TOKEN]".into()
        }
    );
    let a = store.attempt(&attempt).await.unwrap().unwrap();
    assert_eq!(a.summary.as_deref(), Some("printed [redacted:TOKEN]"));
    assert_eq!(
        store.live_messages(&attempt).await.unwrap(),
        [r#"{"content":"[redacted:TOKEN]"}"#]
    );
}

async fn a_warm_sandbox_is_claimed_once(store: Store) {
    let claim = |sandbox: &str, attempt: &str| SandboxClaim {
        sandbox_id: sandbox.into(),
        attempt_id: attempt.into(),
        task_id: "t1".into(),
        claimed_at: 5,
    };
    assert!(store.claim_sandbox(&claim("s1", "a1")).await.unwrap());
    assert!(
        !store.claim_sandbox(&claim("s1", "a2")).await.unwrap(),
        "a sandbox has one attempt"
    );
    assert!(store.claim_sandbox(&claim("s2", "a2")).await.unwrap());
    let ids: Vec<String> = (0..450).map(|i| format!("s{i}")).collect();
    let mut found = store.sandbox_claims(&ids).await.unwrap();
    found.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
    assert_eq!(found, vec![claim("s1", "a1"), claim("s2", "a2")]);
    assert!(store.sandbox_claims(&[]).await.unwrap().is_empty());
}

on_both!(
    a_warm_sandbox_is_claimed_once,
    secrets_are_stored_sealed_and_granted_per_project,
    secret_values_never_reach_the_tables,
    the_audit_log_is_a_gapless_hash_chain_even_with_concurrent_writers,
    approvals_are_answered_once_and_grants_apply_to_their_task_or_project,
    time_held_by_a_person_is_added_up_by_the_transitions_that_end_it,
    pause_and_resume_requests_last_until_the_state_change_that_carries_them_out,
    the_live_conversation_runs_ahead_of_checkpoints,
    a_created_task_reads_back_with_a_queued_attempt,
    projects_are_one_per_source,
    transitions_are_compare_and_set_and_carry_their_event,
    events_are_idempotent_on_seq_and_read_in_order,
    tokens_are_found_by_hash_only,
    checkpoints_carry_the_conversation_and_a_resume_overwrites_its_tail,
);
