//! A configured image is pulled from its registry: a real registry
//! (Debian's `docker-registry`) on a loopback port, a real daemon.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use backshift_sandbox::docker::DockerDriver;
use backshift_sandbox::image::pull;
use backshift_sandbox::tarball::{Owner, archive_file};
use bollard::query_parameters::{CreateImageOptions, RemoveImageOptions};
use futures::StreamExt;
use rand::Rng;
use testkit::Registry;

async fn driver() -> DockerDriver {
    DockerDriver::connect().await.unwrap_or_else(|e| {
        panic!("these tests need a running Docker daemon ({e}); run `cargo xtask test`, which installs and starts it")
    })
}

/// A one-file image whose layer this daemon has never seen, so the pull
/// really downloads it.
async fn import_unique_image(driver: &DockerDriver, tag: &str) {
    let nonce: u64 = rand::rng().random();
    let tar = archive_file(
        "nonce",
        format!("{nonce}\n").as_bytes(),
        0o644,
        Owner { uid: 0, gid: 0 },
    )
    .unwrap();
    let options = CreateImageOptions {
        from_src: Some("-".into()),
        repo: Some(tag.into()),
        ..Default::default()
    };
    let mut stream =
        driver
            .client()
            .create_image(Some(options), Some(bollard::body_full(tar.into())), None);
    while let Some(item) = stream.next().await {
        item.unwrap();
    }
}

async fn remove(driver: &DockerDriver, image: &str) {
    let _ = driver
        .client()
        .remove_image(
            image,
            Some(RemoveImageOptions {
                force: true,
                ..Default::default()
            }),
            None,
        )
        .await;
}

#[tokio::test]
async fn a_registry_image_is_pulled_with_progress() {
    let driver = driver().await;
    let registry = Registry::start().unwrap();
    let local = "backshift-test-pull-src:1";
    import_unique_image(&driver, local).await;
    let reference = registry.push(local, "team/tiny", "v1").unwrap();
    remove(&driver, local).await;
    assert!(!driver.image_exists(&reference).await.unwrap());

    let mut lines = Vec::new();
    let result = pull(&driver, &reference, &mut |l| lines.push(l)).await;
    let exists = driver.image_exists(&reference).await.unwrap();
    remove(&driver, &reference).await;
    result.unwrap_or_else(|e| panic!("pull failed: {e}\nregistry log:\n{}", registry.log()));
    assert!(exists, "the image is there after the pull");
    let text = lines.join("\n");
    assert!(text.contains(&format!("pulling {reference}")), "{text}");
    assert!(text.contains("layer "), "per-layer progress:\n{text}");
    assert!(text.contains("Pull complete"), "{text}");
    assert!(
        text.ends_with(&format!("image {reference} is ready")),
        "{text}"
    );
}

#[tokio::test]
async fn a_missing_tag_or_a_dead_registry_is_a_clear_error() {
    let driver = driver().await;
    let registry = Registry::start().unwrap();
    let missing = format!("{}/team/nothing:v9", registry.host());
    let err = pull(&driver, &missing, &mut |_| {}).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&format!("cannot pull {missing}")), "{msg}");
    assert!(
        msg.contains("not found") || msg.contains("unknown"),
        "the registry's reason is kept: {msg}"
    );

    // A port nothing listens on any more.
    let host = registry.host();
    drop(registry);
    let dead = format!("{host}/team/tiny:v1");
    let msg = pull(&driver, &dead, &mut |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains(&format!("cannot pull {dead}")), "{msg}");
    assert!(msg.contains("connection refused"), "{msg}");

    let msg = pull(&driver, "UPPER/Case:x", &mut |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("cannot pull UPPER/Case:x"), "{msg}");
}
