//! Liveness and readiness.

use crate::serve::App;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use backshift_protocol::{ReadyCheck, ReadyView};
use std::sync::Arc;

/// The process is up.
#[utoipa::path(get, path = "/healthz", security(), responses((status = 200, description = "Alive")))]
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Whether tasks can run now, check by check, with what to do.
#[utoipa::path(get, path = "/readyz", security(), responses(
    (status = 200, description = "Ready", body = ReadyView),
    (status = 503, description = "Not ready; the failing checks say why", body = ReadyView)))]
pub async fn readyz(State(app): State<Arc<App>>) -> (StatusCode, Json<ReadyView>) {
    let mut checks = Vec::new();
    checks.push(match app.store.ping().await {
        Ok(()) => check(
            "database",
            true,
            match app.store.backend() {
                backshift_store::Backend::Sqlite => "SQLite answers".into(),
                backshift_store::Backend::Postgres => "PostgreSQL answers".into(),
            },
            None,
        ),
        Err(e) => check(
            "database",
            false,
            e.to_string(),
            Some("check the data directory's disk and permissions"),
        ),
    });
    // Which sandboxes, and why (chosen at start).
    checks.push(check("sandboxes", true, app.driver_choice.clone(), None));
    let image = app.config.image();
    if let Some(process) = &app.process {
        checks.push(match process.limits_unsupported() {
            None => check(
                "limits",
                true,
                "memory, process and CPU limits applied through control groups".into(),
                None,
            ),
            // Sandboxes run; they are just not limited.
            Some(why) => check(
                "limits",
                true,
                format!("not applied: {why}"),
                Some("run backshift as root to apply them"),
            ),
        });
    } else {
        match app.docker().await {
            Ok(d) => {
                let version = d.ping().await.unwrap_or_default();
                checks.push(check(
                    "docker",
                    true,
                    format!("Docker {version} reachable"),
                    None,
                ));
                checks.push(match d.image_exists(&image).await {
                    Ok(true) => check(
                        "image",
                        true,
                        format!("sandbox image {image} present"),
                        None,
                    ),
                    Ok(false) => check(
                        "image",
                        false,
                        format!("sandbox image {image} is not on the Docker host"),
                        Some(app.config.missing_image_fix()),
                    ),
                    Err(e) => check("image", false, e.to_string(), None),
                });
            }
            Err(e) => {
                checks.push(check(
                "docker",
                false,
                format!("Docker is not reachable: {e}"),
                Some(
                    "install and start the engine (`cargo xtask up` does both), or set DOCKER_HOST",
                ),
            ));
                checks.push(check(
                    "image",
                    false,
                    format!("cannot check {image} without Docker"),
                    None,
                ));
            }
        }
    }
    checks.push(match app.model_config() {
        Ok(m) => check(
            "model",
            true,
            format!("model {} at {}", m.model, m.base_url),
            None,
        ),
        Err(e) => check(
            "model",
            false,
            e,
            Some("configure [model] base_url, model and api_key_env (tasks with a --command run without one)"),
        ),
    });
    let ready = checks.iter().all(|c| c.ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(ReadyView { ready, checks }))
}

fn check(name: &str, ok: bool, message: String, fix: Option<&str>) -> ReadyCheck {
    ReadyCheck {
        name: name.into(),
        ok,
        message,
        fix: fix.map(str::to_owned),
    }
}
