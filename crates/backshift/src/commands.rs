//! The subcommands.

use crate::client::Client;
use crate::render::event_lines;
use crate::{AuditCommand, Cli, Command, ImageCommand, SecretsCommand, TokensCommand};
use anyhow::{Context, bail};
use backshift_core::limits::LimitsRequest;
use backshift_core::policy::{Action, Rule};
use backshift_core::{AttemptId, AttemptState};
use backshift_protocol::{
    AnswerApproval, ApprovalView, AttemptView, AuditEntry, AuditVerification, CreateTaskRequest,
    Decision, Event, GrantSecret, PoolView, ProjectView, RotationView, SandboxView, Scope,
    SecretView, SetEgressRules, SetSecret, TaskCreated, TaskView,
};
use futures::StreamExt;
use reqwest::Method;
use std::io::Write;
use std::time::Duration;

/// Runs the command; returns the process exit code.
pub async fn dispatch(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
        } => serve(config, listen, data_dir).await,
        Command::Image { command } => image(command).await,
        Command::Agents { command } => agents(command).await,
        other => client_command(&cli.server, other).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

async fn client_command(server: &str, command: Command) -> anyhow::Result<i32> {
    let client = Client::new(server)?;
    match command {
        Command::Run {
            prompt,
            repo,
            base,
            agent,
            command,
            max_turns,
            timeout,
            max_tokens,
            verify,
            max_iterations,
            attempts,
            agents,
            follow,
        } => {
            let repo = if backshift_git::is_url(&repo) {
                repo
            } else {
                std::fs::canonicalize(&repo)
                    .with_context(|| format!("repository {repo} does not exist"))?
                    .to_string_lossy()
                    .into_owned()
            };
            let limits = (max_turns.is_some()
                || timeout.is_some()
                || max_tokens.is_some()
                || max_iterations.is_some())
            .then_some(LimitsRequest {
                max_turns,
                wall_time_secs: timeout,
                command_timeout_secs: None,
                max_tokens,
                max_iterations,
            });
            let req = CreateTaskRequest {
                prompt,
                repo,
                base_ref: base,
                agent,
                command,
                limits,
                verify,
                attempts,
                agents,
            };
            let created: TaskCreated = client
                .send(client.request(Method::POST, "/api/v1/tasks").json(&req))
                .await?;
            let task: TaskView = client
                .send(client.request(Method::GET, &format!("/api/v1/tasks/{}", created.id)))
                .await?;
            let branch = task
                .attempts
                .first()
                .map(|a| a.branch.clone())
                .unwrap_or_default();
            println!(
                "task {} created: attempt {} on branch {branch}",
                created.id,
                created.attempts.join(", ")
            );
            if !follow {
                println!("follow it with: backshift logs -f {}", created.id);
                return Ok(0);
            }
            let attempt = created
                .attempts
                .first()
                .cloned()
                .context("the server created no attempt")?;
            if created.attempts.len() == 1 {
                follow_events(&client, &attempt, 0, false).await?;
                return finish_report(&client, &attempt).await;
            }
            // Several: the first one's events, then all of them side by
            // side once every one has ended.
            println!(
                "following {attempt}; the other {} run alongside",
                created.attempts.len() - 1
            );
            follow_events(&client, &attempt, 0, false).await?;
            let mut waited_for_choice = 0;
            let task = loop {
                let task: TaskView = client
                    .send(client.request(Method::GET, &format!("/api/v1/tasks/{}", created.id)))
                    .await?;
                // Ended, and its result chosen when one succeeded (that
                // follows the last attempt's end by a moment).
                let ended = task.attempts.iter().all(|a| a.state.is_terminal());
                let chosen = task.winner.is_some()
                    || !task
                        .attempts
                        .iter()
                        .any(|a| a.state == backshift_core::AttemptState::Succeeded);
                if ended {
                    waited_for_choice += 1;
                }
                if ended && (chosen || waited_for_choice > 30) {
                    break task;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            };
            println!();
            print!("{}", crate::render::comparison(&task));
            Ok(i32::from(
                task.state != backshift_core::AttemptState::Succeeded,
            ))
        }
        Command::Ls => {
            let tasks: Vec<TaskView> = client
                .send(client.request(Method::GET, "/api/v1/tasks"))
                .await?;
            if tasks.is_empty() {
                println!("no tasks yet; start one with: backshift run \"PROMPT\" --repo PATH");
                return Ok(0);
            }
            println!("{:<10} {:<18} {:<24} PROMPT", "TASK", "STATE", "CREATED");
            for t in tasks {
                let prompt: String = t
                    .prompt
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(60)
                    .collect();
                println!(
                    "{:<10} {:<18} {:<24} {prompt}",
                    t.id,
                    t.state.as_str(),
                    t.created_at
                );
            }
            Ok(0)
        }
        Command::Show { id, json } => {
            let task_id = id.split('-').next().unwrap_or(&id).to_owned();
            let task: TaskView = client
                .send(client.request(Method::GET, &format!("/api/v1/tasks/{task_id}")))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&task)?);
                return Ok(0);
            }
            println!(
                "task     {}\nstate    {}\nrepo     {}\nagent    {}\ncreated  {}\nprompt   {}",
                task.id, task.state, task.repo, task.agent, task.created_at, task.prompt
            );
            // What waits for a person, per attempt.
            let pending: Vec<ApprovalView> = if task
                .attempts
                .iter()
                .any(|a| a.state == backshift_core::AttemptState::WaitingApproval)
            {
                client
                    .send(client.request(Method::GET, "/api/v1/approvals"))
                    .await?
            } else {
                Vec::new()
            };
            if let Some(w) = &task.winner {
                println!(
                    "result   {w} (chosen by {})",
                    task.winner_by.as_deref().unwrap_or("?")
                );
            }
            if let Some(d) = &task.delivery {
                println!("{}", crate::render::delivery_line(d));
            }
            if let Some(h) = &task.handoff {
                println!("\n{}", h.trim_end());
            }
            for a in &task.attempts {
                println!("\nattempt  {} ({})\nbranch   {}", a.id, a.state, a.branch);
                if task.attempts.len() > 1 {
                    println!(
                        "agent    {}\nrank     {} of {}",
                        a.agent,
                        a.rank,
                        task.attempts.len()
                    );
                }
                for p in pending.iter().filter(|p| p.attempt_id == a.id) {
                    println!(
                        "waiting  {}: {} (backshift approve {} | backshift deny {}; denied at {} unless answered)",
                        p.id, p.summary, p.id, p.id, p.expires_at
                    );
                }
                if let Some(r) = a.reason {
                    println!("reason   {r}");
                }
                if let Some(d) = &a.detail {
                    println!("detail   {d}");
                }
                if let Some(u) = &a.usage {
                    println!(
                        "model    {} call(s), {} in / {} out tokens{}",
                        u.calls,
                        u.input_tokens,
                        u.output_tokens,
                        u.cost_usd.map_or(String::new(), |c| format!(", ${c:.4}"))
                    );
                }
                if let Some(r) = &a.driver {
                    println!("driver   {r}");
                }
                if !a.log_tail.is_empty() {
                    println!("log tail (the end of `backshift logs {}`):", a.id);
                    for l in &a.log_tail {
                        println!("  | {l}");
                    }
                }
                if let Some(v) = &a.verification {
                    println!(
                        "verified {} ({} run(s); `{}`)",
                        crate::render::verification_line(v),
                        a.verifications,
                        v.command.lines().next().unwrap_or_default()
                    );
                    for f in &v.report.failures {
                        println!("  ✗ {}", f.name);
                        for l in f.message.lines().take(8) {
                            println!("    {l}");
                        }
                    }
                    if !v.passed && v.report.failures.is_empty() && !v.output_tail.trim().is_empty()
                    {
                        println!("  the end of its output:");
                        let lines: Vec<&str> = v.output_tail.lines().collect();
                        for l in &lines[lines.len().saturating_sub(15)..] {
                            println!("  | {l}");
                        }
                    }
                }
                if let Some(h) = &a.head_commit {
                    println!("head     {h}");
                }
                if let Some(s) = &a.summary {
                    println!(
                        "summary  {}",
                        s.lines().collect::<Vec<_>>().join("\n         ")
                    );
                }
            }
            Ok(0)
        }
        Command::Compare { id } => {
            let task: TaskView = client
                .send(client.request(Method::GET, &format!("/api/v1/tasks/{id}")))
                .await?;
            print!("{}", crate::render::comparison(&task));
            Ok(0)
        }
        Command::Pick { id, attempt } => {
            let task: TaskView = client
                .send(
                    client
                        .request(Method::POST, &format!("/api/v1/tasks/{id}/pick"))
                        .json(&backshift_protocol::PickAttempt { attempt }),
                )
                .await?;
            let winner = task.winner.as_deref().unwrap_or("none");
            let branch = task
                .attempts
                .iter()
                .find(|a| a.id == winner)
                .map(|a| a.branch.as_str())
                .unwrap_or("");
            println!(
                "task {} delivers attempt {winner} (branch {branch}); `backshift checkout {}` fetches it",
                task.id, task.id
            );
            Ok(0)
        }
        Command::Deliver { id } => {
            let task: TaskView = client
                .send(client.request(Method::POST, &format!("/api/v1/tasks/{id}/deliver")))
                .await?;
            println!(
                "delivering {} of task {}; `backshift show {}` says how it went",
                task.winner.as_deref().unwrap_or("?"),
                task.id,
                task.id
            );
            Ok(0)
        }
        Command::Logs { id, follow, json } => {
            let attempt = resolve_attempt(&client, &id).await?;
            if follow {
                follow_events(&client, &attempt.id, 0, json).await?;
                return Ok(0);
            }
            let mut after = 0;
            loop {
                let page: Vec<Event> = client
                    .send(client.request(
                        Method::GET,
                        &format!(
                            "/api/v1/attempts/{}/events?after={after}&limit=1000",
                            attempt.id
                        ),
                    ))
                    .await?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                for e in &page {
                    print_event(e, json);
                }
            }
            Ok(0)
        }
        Command::Diff { id } => {
            let attempt = resolve_attempt(&client, &id).await?;
            let resp = client
                .send_raw(client.request(
                    Method::GET,
                    &format!("/api/v1/attempts/{}/diff", attempt.id),
                ))
                .await?;
            print!("{}", resp.text().await?);
            Ok(0)
        }
        Command::Checkout {
            id,
            repo,
            no_switch,
        } => checkout(&client, &id, &repo, no_switch).await,
        Command::Cancel { id } => {
            let task: TaskView = client
                .send(client.request(Method::POST, &format!("/api/v1/tasks/{id}/cancel")))
                .await?;
            println!("task {} is {}", task.id, task.state);
            Ok(0)
        }
        Command::Pause { id } => pause_or_resume(&client, &id, true).await,
        Command::Resume { id } => pause_or_resume(&client, &id, false).await,
        Command::Approvals { all } => {
            let path = if all {
                "/api/v1/approvals?state=all"
            } else {
                "/api/v1/approvals"
            };
            let list: Vec<ApprovalView> = client.send(client.request(Method::GET, path)).await?;
            if list.is_empty() {
                println!(
                    "{}",
                    if all {
                        "no approvals yet"
                    } else {
                        "nothing is waiting for approval"
                    }
                );
            }
            for a in &list {
                println!("{}", approval_line(a));
            }
            Ok(0)
        }
        Command::Approve { id, scope, reason } => {
            answer(&client, &id, Decision::Approve, scope.into(), reason).await
        }
        Command::Deny { id, reason } => {
            answer(&client, &id, Decision::Deny, Scope::Once, reason).await
        }
        Command::Sandboxes => {
            let list: Vec<SandboxView> = client
                .send(client.request(Method::GET, "/api/v1/sandboxes"))
                .await?;
            if list.is_empty() {
                println!("no sandboxes: none of this server's attempts is running");
            } else {
                println!(
                    "{:<14} {:<12} {:>6} {:>19} {:>5} {:>19}",
                    "SANDBOX", "ATTEMPT", "CPU", "MEMORY", "PIDS", "DISK"
                );
            }
            let mib = |b: u64| format!("{:.0} MiB", b as f64 / 1048576.0);
            for s in &list {
                let disk = match (s.disk_bytes, s.disk_limit_bytes) {
                    (Some(d), Some(l)) => format!("{} / {}", mib(d), mib(l)),
                    (Some(d), None) => mib(d),
                    _ => "?".into(),
                };
                println!(
                    "{:<14} {:<12} {:>6} {:>19} {:>5} {:>19}{}",
                    &s.id[..12.min(s.id.len())],
                    s.attempt_id.as_deref().unwrap_or("-"),
                    s.cpu_percent.map_or("?".into(), |c| format!("{c:.1}%")),
                    format!("{} / {}", mib(s.memory_bytes), mib(s.memory_limit_bytes)),
                    s.pids,
                    disk,
                    match (s.running, s.attempt_state) {
                        (false, Some(AttemptState::Paused)) =>
                            "  (paused: `backshift resume` starts it again)".to_owned(),
                        (false, _) => "  (stopped)".to_owned(),
                        (true, _) => match s.role.as_deref() {
                            Some("warm") => "  (warm: ready for the next task)".to_owned(),
                            Some(role) if role != "agent" => format!("  ({role})"),
                            _ if s.from_pool => "  (from the warm pool)".to_owned(),
                            _ => String::new(),
                        },
                    }
                );
            }
            if let Some(note) = list.iter().find_map(|s| s.disk_limit_note.as_deref()) {
                println!("no disk limit is applied: {note}");
            }
            Ok(0)
        }
        Command::Pool => {
            let pool: PoolView = client
                .send(client.request(Method::GET, "/api/v1/pool"))
                .await?;
            print!("{}", crate::render::pool(&pool));
            Ok(0)
        }
        Command::Projects => {
            let list: Vec<ProjectView> = client
                .send(client.request(Method::GET, "/api/v1/projects"))
                .await?;
            if list.is_empty() {
                println!(
                    "no projects yet: a project appears with the first task on its repository"
                );
            }
            for p in &list {
                println!(
                    "{}  {}  ({} egress rules)",
                    p.id,
                    p.source,
                    p.egress_rules.len()
                );
            }
            Ok(0)
        }
        Command::Egress {
            project,
            add,
            remove,
            clear,
        } => egress(&client, &project, &add, &remove, clear).await,
        Command::Docker { project, setting } => {
            let p = find_project(&client, &project).await?;
            let p: ProjectView = client
                .send(
                    client
                        .request(Method::PUT, &format!("/api/v1/projects/{}/docker", p.id))
                        .json(&serde_json::json!({"enabled": setting == "on"})),
                )
                .await?;
            println!(
                "project {} ({}): {}",
                p.id,
                p.source,
                if p.docker_engine {
                    "its next sandboxes get a Docker engine of their own (DOCKER_HOST is set in them)"
                } else {
                    "its sandboxes have no Docker engine"
                }
            );
            Ok(0)
        }
        Command::Secrets { command } => secrets(&client, command).await,
        Command::Tokens { command } => tokens(&client, command).await,
        Command::Audit {
            command: Some(AuditCommand::Verify),
            ..
        } => {
            let v: AuditVerification = client
                .send(client.request(Method::GET, "/api/v1/audit/verify"))
                .await?;
            if v.ok {
                println!(
                    "the audit log is intact: {} rows, chained{}",
                    v.rows,
                    match v.head_seq {
                        Some(s) => format!(", ending at row {s} as recorded outside the database"),
                        None => String::new(),
                    }
                );
                Ok(0)
            } else {
                println!("the audit log was tampered with ({} rows):", v.rows);
                for p in &v.problems {
                    println!("  {p}");
                }
                Ok(1)
            }
        }
        Command::Audit {
            command: None,
            after,
            jsonl,
        } => {
            let mut after = after;
            loop {
                let page: Vec<AuditEntry> = client
                    .send(client.request(
                        Method::GET,
                        &format!("/api/v1/audit?after={after}&limit=1000"),
                    ))
                    .await?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                for e in &page {
                    if jsonl {
                        println!("{}", serde_json::to_string(e)?);
                    } else {
                        println!(
                            "{:>6}  {}  {}  {}  {}  {}",
                            e.seq, e.ts, e.actor, e.action, e.target, e.detail
                        );
                    }
                }
            }
            Ok(0)
        }
        Command::Serve { .. }
        | Command::Image { .. }
        | Command::Agents { .. }
        | Command::Shim { .. } => {
            bail!("not a client command")
        }
    }
}

/// The project named by id or by its repository.
async fn find_project(client: &Client, name: &str) -> anyhow::Result<ProjectView> {
    let list: Vec<ProjectView> = client
        .send(client.request(Method::GET, "/api/v1/projects"))
        .await?;
    let path = std::fs::canonicalize(name)
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    list.into_iter()
        .find(|p| p.id == name || p.source == name || Some(&p.source) == path.as_ref())
        .with_context(|| {
            format!("no project {name}: give a project id (`backshift projects`) or the repository a task ran on")
        })
}

/// A rule written as "ACTION HOST[:PORT,...] [METHOD,...] [/PATH_PREFIX]".
fn parse_rule(text: &str) -> anyhow::Result<Rule> {
    let mut words = text.split_whitespace();
    let action = match words.next() {
        Some("allow") => Action::Allow,
        Some("deny") => Action::Deny,
        Some("ask") => Action::Ask,
        other => bail!(
            "rule `{text}` starts with {}, not allow, deny or ask",
            other.unwrap_or("nothing")
        ),
    };
    let target = words
        .next()
        .with_context(|| format!("rule `{text}` names no host"))?;
    let (host, ports) = match target.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            let ports = p
                .split(',')
                .map(|x| {
                    x.parse::<u16>()
                        .with_context(|| format!("`{x}` in rule `{text}` is not a port"))
                })
                .collect::<anyhow::Result<Vec<u16>>>()?;
            (h.to_owned(), ports)
        }
        _ => (target.to_owned(), Vec::new()),
    };
    let mut rule = Rule {
        host,
        ports,
        methods: Vec::new(),
        path_prefix: None,
        action,
    };
    for w in words {
        if w.starts_with('/') {
            rule.path_prefix = Some(w.to_owned());
        } else {
            rule.methods = w.split(',').map(str::to_ascii_uppercase).collect();
        }
    }
    rule.check()
        .map_err(|e| anyhow::anyhow!("rule `{text}`: {e}"))?;
    Ok(rule)
}

async fn egress(
    client: &Client,
    project: &str,
    add: &[String],
    remove: &[usize],
    clear: bool,
) -> anyhow::Result<i32> {
    let mut p = find_project(client, project).await?;
    if clear || !add.is_empty() || !remove.is_empty() {
        let mut rules = if clear {
            Vec::new()
        } else {
            p.egress_rules.clone()
        };
        let mut gone: Vec<usize> = remove.to_vec();
        gone.sort_unstable();
        gone.dedup();
        for n in gone.into_iter().rev() {
            if n == 0 || n > rules.len() {
                bail!(
                    "there is no rule {n}: the project has {} (see `backshift egress {project}`)",
                    rules.len()
                );
            }
            rules.remove(n - 1);
        }
        for text in add {
            rules.push(parse_rule(text)?);
        }
        p = client
            .send(
                client
                    .request(Method::PUT, &format!("/api/v1/projects/{}/egress", p.id))
                    .json(&SetEgressRules { rules }),
            )
            .await?;
    }
    println!("project {} ({})", p.id, p.source);
    if p.egress_rules.is_empty() {
        println!("  no rules of its own: the server's [egress] rules and default decide");
    }
    for (i, r) in p.egress_rules.iter().enumerate() {
        println!("  {}. {}", i + 1, r.describe());
    }
    Ok(0)
}

async fn tokens(client: &Client, command: TokensCommand) -> anyhow::Result<i32> {
    match command {
        TokensCommand::Ls => {
            let list: Vec<backshift_protocol::TokenView> = client
                .send(client.request(Method::GET, "/api/v1/tokens"))
                .await?;
            println!("{:<24} CREATED", "NAME");
            for t in list {
                println!("{:<24} {}", t.name, t.created_at);
            }
        }
        TokensCommand::Create { name } => {
            let made: backshift_protocol::TokenCreated = client
                .send(
                    client
                        .request(Method::POST, "/api/v1/tokens")
                        .json(&backshift_protocol::CreateToken { name }),
                )
                .await?;
            println!(
                "token {} (shown this once; backshift keeps only its hash):\n{}",
                made.name, made.token
            );
        }
        TokensCommand::Revoke { name } => {
            client
                .send_raw(client.request(Method::DELETE, &format!("/api/v1/tokens/{name}")))
                .await?;
            println!("token {name} is revoked");
        }
    }
    Ok(0)
}

async fn secrets(client: &Client, command: SecretsCommand) -> anyhow::Result<i32> {
    match command {
        SecretsCommand::Set { name, from_env } => {
            let value = match from_env {
                Some(var) => std::env::var(&var)
                    .with_context(|| format!("{var} is not set in this environment"))?,
                None => {
                    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                        eprintln!("value of {name} (end with Enter):");
                    }
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\n', '\r']).to_owned()
                }
            };
            let s: SecretView = client
                .send(
                    client
                        .request(Method::PUT, &format!("/api/v1/secrets/{name}"))
                        .json(&SetSecret { value }),
                )
                .await?;
            println!("secret {} is set (sealed with key {})", s.name, s.key_id);
        }
        SecretsCommand::Ls => {
            let list: Vec<SecretView> = client
                .send(client.request(Method::GET, "/api/v1/secrets"))
                .await?;
            if list.is_empty() {
                println!("no secrets");
            }
            for s in &list {
                let grants: Vec<String> = s
                    .grants
                    .iter()
                    .map(|g| {
                        format!(
                            "{} as {}{}",
                            g.project_id,
                            g.var,
                            if g.setup_only { " (setup only)" } else { "" }
                        )
                    })
                    .collect();
                println!(
                    "{}  set {}  key {}  {}",
                    s.name,
                    s.updated_at,
                    s.key_id,
                    if grants.is_empty() {
                        "granted to no project".to_owned()
                    } else {
                        format!("granted to {}", grants.join(", "))
                    }
                );
            }
        }
        SecretsCommand::Rm { name } => {
            client
                .send_raw(client.request(Method::DELETE, &format!("/api/v1/secrets/{name}")))
                .await?;
            println!("secret {name} is deleted");
        }
        SecretsCommand::Grant {
            name,
            project,
            var,
            setup_only,
        } => {
            let p = find_project(client, &project).await?;
            let _: SecretView = client
                .send(
                    client
                        .request(
                            Method::PUT,
                            &format!("/api/v1/projects/{}/secrets/{name}", p.id),
                        )
                        .json(&GrantSecret {
                            var: var.clone(),
                            setup_only,
                        }),
                )
                .await?;
            if setup_only {
                println!(
                    "project {}'s setup (postCreateCommand) gets secret {name} as ${var}; its agents never do",
                    p.id
                );
            } else {
                println!("project {}'s sandboxes get secret {name} as ${var}", p.id);
            }
        }
        SecretsCommand::Revoke { name, project } => {
            let p = find_project(client, &project).await?;
            client
                .send_raw(client.request(
                    Method::DELETE,
                    &format!("/api/v1/projects/{}/secrets/{name}", p.id),
                ))
                .await?;
            println!("project {} no longer gets secret {name}", p.id);
        }
        SecretsCommand::Rotate => {
            let r: RotationView = client
                .send(client.request(Method::POST, "/api/v1/secrets/rotate"))
                .await?;
            println!("{} secrets re-sealed with key {}", r.resealed, r.key_id);
        }
    }
    Ok(0)
}

/// One approval in one line.
fn approval_line(a: &ApprovalView) -> String {
    let state = match (a.state.as_str(), &a.answered_by) {
        ("pending", _) => format!("pending until {}", a.expires_at),
        (s, Some(by)) => {
            let scope = a
                .scope
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            format!("{s}{scope} by {by}")
        }
        (s, None) => s.to_owned(),
    };
    format!(
        "{}  {}  {}  {}  {state}",
        a.id, a.attempt_id, a.kind, a.summary
    )
}

async fn answer(
    client: &Client,
    id: &str,
    decision: Decision,
    scope: Scope,
    reason: Option<String>,
) -> anyhow::Result<i32> {
    let body = AnswerApproval {
        decision,
        scope,
        reason,
    };
    let a: ApprovalView = client
        .send(
            client
                .request(Method::POST, &format!("/api/v1/approvals/{id}"))
                .json(&body),
        )
        .await?;
    println!("{}", approval_line(&a));
    Ok(0)
}

/// Pauses (or resumes) an attempt, or each of a task's attempts that can
/// be; prints where each stands.
async fn pause_or_resume(client: &Client, id: &str, pause: bool) -> anyhow::Result<i32> {
    let verb = if pause { "pause" } else { "resume" };
    let ids: Vec<String> = if AttemptId::parse(id).is_some() {
        vec![id.to_owned()]
    } else {
        let task: TaskView = client
            .send(client.request(Method::GET, &format!("/api/v1/tasks/{id}")))
            .await?;
        let fits = |s: AttemptState| {
            if pause {
                matches!(s, AttemptState::Running | AttemptState::WaitingApproval)
            } else {
                s == AttemptState::Paused
            }
        };
        let ids: Vec<String> = task
            .attempts
            .iter()
            .filter(|a| fits(a.state))
            .map(|a| a.id.clone())
            .collect();
        if ids.is_empty() {
            let states: Vec<String> = task
                .attempts
                .iter()
                .map(|a| format!("{} is {}", a.id, a.state))
                .collect();
            anyhow::bail!(
                "task {id} has no attempt to {verb} ({}): {}",
                states.join(", "),
                if pause {
                    "only a running attempt, or one waiting for approval, can be paused"
                } else {
                    "only a paused attempt can be resumed"
                }
            );
        }
        ids
    };
    for attempt in ids {
        eprintln!("{verb} {attempt}: waiting for it to get there…");
        let view: AttemptView = client
            .send(client.request(Method::POST, &format!("/api/v1/attempts/{attempt}/{verb}")))
            .await?;
        let pending = if pause {
            view.pause_requested
        } else {
            view.resume_requested
        };
        if pending {
            println!(
                "attempt {} is {}; the {verb} is under way{}",
                view.id,
                view.state,
                if pause {
                    ""
                } else {
                    " (it waits for a free slot: [supervisor] max_concurrent_attempts)"
                }
            );
        } else {
            println!("attempt {} is {}", view.id, view.state);
        }
    }
    Ok(0)
}

/// A task id means its latest attempt.
async fn resolve_attempt(client: &Client, id: &str) -> anyhow::Result<AttemptView> {
    if AttemptId::parse(id).is_some() {
        return client
            .send(client.request(Method::GET, &format!("/api/v1/attempts/{id}")))
            .await;
    }
    let task: TaskView = client
        .send(client.request(Method::GET, &format!("/api/v1/tasks/{id}")))
        .await?;
    // The task's result when one is chosen, else its last attempt.
    let winner = task.winner.clone();
    let mut attempts = task.attempts;
    if let Some(w) = winner
        && let Some(i) = attempts.iter().position(|a| a.id == w)
    {
        return Ok(attempts.swap_remove(i));
    }
    attempts.pop().context("the task has no attempts")
}

fn print_event(e: &Event, json: bool) {
    if json {
        println!("{}", serde_json::to_string(e).unwrap_or_default());
    } else {
        println!("{}", event_lines(e));
    }
    let _ = std::io::stdout().flush();
}

/// Follows the SSE stream until the server sends `end`, reconnecting with
/// `Last-Event-ID` if the connection drops.
async fn follow_events(
    client: &Client,
    attempt: &str,
    mut last: u64,
    json: bool,
) -> anyhow::Result<()> {
    let mut failures = 0;
    loop {
        let req = client
            .request(
                Method::GET,
                &format!("/api/v1/attempts/{attempt}/events/stream"),
            )
            .header("last-event-id", last.to_string())
            .header("accept", "text/event-stream");
        let resp = match client.send_raw(req).await {
            Ok(r) => r,
            Err(e) if failures < 30 => {
                failures += 1;
                eprintln!("(connection lost: {e}; reconnecting)");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { break };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let (mut kind, mut data) = (String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if kind == "end" {
                    return Ok(());
                }
                if data.is_empty() {
                    continue;
                }
                if let Ok(e) = serde_json::from_str::<Event>(&data)
                    && e.seq > last
                {
                    last = e.seq;
                    failures = 0;
                    print_event(&e, json);
                }
            }
        }
        failures += 1;
        if failures > 30 {
            bail!("lost the event stream of {attempt} and could not reconnect");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn finish_report(client: &Client, attempt: &str) -> anyhow::Result<i32> {
    let a: AttemptView = client
        .send(client.request(Method::GET, &format!("/api/v1/attempts/{attempt}")))
        .await?;
    if a.state == backshift_core::AttemptState::Succeeded {
        println!(
            "\nsucceeded: branch {} — see it with `backshift diff {}`, fetch it with `backshift checkout {}`",
            a.branch, a.task_id, a.task_id
        );
        Ok(0)
    } else {
        let reason = a.reason.map(|r| format!(" ({r})")).unwrap_or_default();
        println!("\n{}{reason}: {}", a.state, a.detail.unwrap_or_default());
        Ok(1)
    }
}

async fn checkout(
    client: &Client,
    id: &str,
    repo: &std::path::Path,
    no_switch: bool,
) -> anyhow::Result<i32> {
    let a = resolve_attempt(client, id).await?;
    // An attempt that ended without success may have kept its last work
    // on its branch (see its task's handoff).
    if a.head_commit.is_none() && !a.state.is_terminal() {
        bail!(
            "attempt {} is {} and has no branch to check out yet",
            a.id,
            a.state
        );
    }
    let url = format!("{}{}", client.url, a.git_path);
    let refspec = format!("+refs/heads/{0}:refs/heads/{0}", a.branch);
    // The token travels in git's environment, not its arguments, so it
    // never shows up in the process list.
    let status = tokio::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["fetch", "--no-tags", &url, &refspec])
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "http.extraHeader")
        .env(
            "GIT_CONFIG_VALUE_0",
            format!("Authorization: Bearer {}", client.token),
        )
        .status()
        .await
        .context("cannot run git")?;
    if !status.success() {
        if a.head_commit.is_none() {
            bail!(
                "attempt {} ended {} without saving any work: there is no branch to fetch",
                a.id,
                a.state
            );
        }
        bail!("git fetch of {} from {url} failed ({status})", a.branch);
    }
    match &a.head_commit {
        Some(head) => println!("fetched {} ({head})", a.branch),
        None => println!(
            "fetched {}: the last work of attempt {}, which ended {}",
            a.branch, a.id, a.state
        ),
    }
    if no_switch {
        return Ok(0);
    }
    let status = tokio::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["switch", "--quiet", &a.branch])
        .status()
        .await
        .context("cannot run git")?;
    if !status.success() {
        bail!(
            "the branch was fetched but `git switch {}` failed (uncommitted changes?); switch by hand",
            a.branch
        );
    }
    println!("switched to {}", a.branch);
    Ok(0)
}

async fn serve(
    config: Option<std::path::PathBuf>,
    listen: Option<String>,
    data_dir: Option<std::path::PathBuf>,
) -> anyhow::Result<i32> {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("BACKSHIFT_LOG")
        .unwrap_or_else(|_| "info".into());
    // Docker's client logs request bodies at debug level, and a sandbox's
    // create request holds its environment (its token, granted secrets):
    // never below info, whatever BACKSHIFT_LOG asks for.
    if let Ok(cap) = "bollard=info".parse() {
        filter = filter.add_directive(cap);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let mut cfg = backshift_server::Config::load(config.as_deref())?;
    if let Some(l) = listen {
        cfg.listen = l;
    }
    if let Some(d) = data_dir {
        cfg.data_dir = Some(d);
    }
    let server = backshift_server::start(cfg).await?;
    let url = format!("http://{}", server.addr);
    println!("backshift listening on {url}");
    println!("data directory: {}", server.data_dir.display());
    if let Some(token) = &server.new_token {
        let path = crate::credentials::save(&url, token)?;
        println!(
            "first start: created an admin API token (shown once, saved for the CLI in {}):\n  {token}",
            path.display()
        );
    } else if crate::credentials::load(&url).is_none() {
        println!(
            "note: no token for {url} in {}; use BACKSHIFT_TOKEN",
            crate::credentials::path().display()
        );
    }
    let _ = std::io::stdout().flush();
    let ready = reqwest::get(format!("{url}/readyz")).await;
    if let Ok(resp) = ready
        && let Ok(view) = resp.json::<backshift_protocol::ReadyView>().await
    {
        for c in &view.checks {
            let fix = c
                .fix
                .as_ref()
                .map(|f| format!(" — {f}"))
                .unwrap_or_default();
            println!(
                "  [{}] {}: {}{fix}",
                if c.ok { "ok" } else { "!!" },
                c.name,
                c.message
            );
        }
        println!(
            "{}",
            if view.ready {
                "ready for tasks"
            } else {
                "NOT ready for tasks yet (see above)"
            }
        );
    }
    let _ = std::io::stdout().flush();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = server.stopped() => {}
    }
    println!(
        "shutting down: running attempts stay in their sandboxes and resume when a server starts again"
    );
    server.shutdown().await;
    Ok(0)
}

/// The local Docker daemon, answering, or why not.
async fn docker(purpose: &str) -> anyhow::Result<backshift_sandbox::docker::DockerDriver> {
    let driver = backshift_sandbox::docker::DockerDriver::connect()
        .await
        .with_context(|| format!("Docker is needed to {purpose}"))?;
    driver
        .ping()
        .await
        .context("the Docker daemon does not answer; start it first (`cargo xtask setup` does)")?;
    Ok(driver)
}

async fn image(command: ImageCommand) -> anyhow::Result<i32> {
    use backshift_sandbox::image::{BootstrapOptions, DEFAULT, ENGINE, bootstrap};
    let recipe = |engine: bool| if engine { ENGINE } else { DEFAULT };
    match command {
        ImageCommand::Tag { engine } => {
            println!("{}", recipe(engine).tag());
            Ok(0)
        }
        ImageCommand::Pull { reference } => {
            let driver = docker("pull the image").await?;
            let started = std::time::Instant::now();
            backshift_sandbox::image::pull(&driver, &reference, &mut |line| {
                println!("  {line}");
                let _ = std::io::stdout().flush();
            })
            .await?;
            println!("done in {:.1?}", started.elapsed());
            Ok(0)
        }
        ImageCommand::Bootstrap {
            mirror,
            force,
            engine,
        } => {
            let driver = docker("build the image").await?;
            let recipe = recipe(engine);
            let tag = recipe.tag();
            if !force && driver.image_exists(&tag).await? {
                println!("image {tag} already exists (use --force to rebuild)");
                return Ok(0);
            }
            let options = BootstrapOptions {
                recipe,
                tag,
                mirror,
                work_dir: std::env::temp_dir(),
            };
            let started = std::time::Instant::now();
            bootstrap(&driver, &options, &mut |line| {
                println!("  {line}");
                let _ = std::io::stdout().flush();
            })
            .await?;
            println!("done in {:.0?}", started.elapsed());
            Ok(0)
        }
    }
}

/// The agents directory of the server a config (and data directory) name.
fn agents_config(place: &crate::AgentsPlace) -> anyhow::Result<backshift_server::Config> {
    let mut cfg = backshift_server::Config::load(place.config.as_deref())?;
    if let Some(d) = &place.data_dir {
        cfg.data_dir = Some(d.clone());
    }
    Ok(cfg)
}

fn agents_dir(place: &crate::AgentsPlace) -> anyhow::Result<std::path::PathBuf> {
    Ok(agents_config(place)?.agents_dir())
}

async fn agents(command: crate::AgentsCommand) -> anyhow::Result<i32> {
    use backshift_server::agents;
    match command {
        crate::AgentsCommand::Install { spec, place } => {
            let dir = agents_dir(&place)?;
            let (recipe, version) = agents::parse_spec(&spec).map_err(anyhow::Error::msg)?;
            let installed = tokio::task::spawn_blocking(move || {
                agents::install(&dir, recipe, version.as_deref(), &mut |m| {
                    println!("==> {m}")
                })
            })
            .await??;
            println!(
                "{} {} is ready; it is mounted read-only into new sandboxes at {}",
                installed.manifest.name,
                installed.manifest.version,
                installed.sandbox_dir()
            );
            Ok(0)
        }
        crate::AgentsCommand::Ls { place } => {
            let config = agents_config(&place)?;
            let dir = config.agents_dir();
            let found = agents::installed(&dir);
            if found.is_empty() {
                println!(
                    "no agents installed in {} (the built-in agent needs none); install one with `backshift agents install opencode`",
                    dir.display()
                );
                return Ok(0);
            }
            println!(
                "{:<12} {:<12} {:<34} {:<10} TASKS",
                "AGENT", "VERSION", "PACKAGE", "NODE"
            );
            for a in found {
                let m = a.manifest;
                // Whether this server's config lets it take tasks.
                let tasks = match agents::not_runnable(&config, &m.name) {
                    None => format!("ready (--agent {})", m.name),
                    Some((why, fix)) => format!("not ready: {why}; {fix}"),
                };
                println!(
                    "{:<12} {:<12} {:<34} {:<10} {tasks}",
                    m.name,
                    m.version,
                    m.package,
                    m.node.unwrap_or_else(|| "-".into())
                );
            }
            Ok(0)
        }
    }
}
