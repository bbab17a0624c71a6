//! The S3-compatible file store against a real S3 API on loopback: moto's server
//! (`AIHUB_TEST_MOTO`, installed by deploy/local/test-tools.sh). Small objects (one PUT) and
//! large ones (multipart), streamed reads, removal, limits, names.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aihub_tasks::config::S3Config;
use aihub_tasks::files::{FileError, FileStore};
use aihub_tasks::S3Files;
use tokio::io::AsyncReadExt;

struct Moto {
    child: Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn moto() -> Moto {
    let bin = std::env::var("AIHUB_TEST_MOTO").unwrap_or_else(|_| "moto_server".into());
    let port = free_port();
    let child = Command::new(&bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{bin}: {e} (source deploy/local/test-tools.sh)"));
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{url}/")).send().await.is_err() {
        assert!(Instant::now() < deadline, "moto did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Moto { child, url }
}

fn config(url: &str, bucket: &str, prefix: &str) -> S3Config {
    // SAFETY of the environment: tests in this file set the same values.
    std::env::set_var("AIHUB_TEST_S3_KEY", "test-key");
    std::env::set_var("AIHUB_TEST_S3_SECRET", "test-secret");
    serde_json::from_value(serde_json::json!({
        "bucket": bucket,
        "endpoint": url,
        "prefix": prefix,
        "access_key_id_env": "AIHUB_TEST_S3_KEY",
        "secret_access_key_env": "AIHUB_TEST_S3_SECRET",
        "allow_http": true,
    }))
    .unwrap()
}

async fn read_all(store: &dyn FileStore, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    store
        .open(name)
        .await
        .unwrap()
        .read_to_end(&mut out)
        .await
        .unwrap();
    out
}

#[tokio::test]
async fn objects_round_trip_through_an_s3_api() {
    let m = moto().await;
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{}/aihub-files", m.url))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "bucket: {}", r.status());
    let spool = tempfile::tempdir().unwrap();
    let store = S3Files::new(
        &config(&m.url, "aihub-files", "prod/files"),
        spool.path().into(),
    )
    .unwrap();

    // A small object: one PUT; invisible until committed.
    let mut w = store.create("dev_1/file-small", 1 << 20).await.unwrap();
    w.write(b"{\"a\":1}\n").await.unwrap();
    assert!(matches!(
        store.open("dev_1/file-small").await,
        Err(FileError::NotFound)
    ));
    let written = w.commit().await.unwrap();
    assert_eq!(written.bytes, 8);
    assert_eq!(read_all(&store, "dev_1/file-small").await, b"{\"a\":1}\n");
    // Under the prefix, per developer, as the bucket shows it.
    let listing = http
        .get(format!("{}/aihub-files?list-type=2", m.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        listing.contains("<Key>prod/files/dev_1/file-small</Key>"),
        "{listing}"
    );

    // A large one: a multipart upload (20 MiB in 8 MiB parts), read back streamed.
    let big: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut w = store.create("dev_1/file-big", 64 << 20).await.unwrap();
    for chunk in big.chunks(100_000) {
        w.write(chunk).await.unwrap();
    }
    let written = w.commit().await.unwrap();
    assert_eq!(written.bytes, big.len() as u64);
    assert!(
        read_all(&store, "dev_1/file-big").await == big,
        "the bytes round-trip"
    );
    assert_eq!(
        std::fs::read_dir(spool.path()).unwrap().count(),
        0,
        "spooled files are removed"
    );

    // Limits, names, removal.
    let mut w = store.create("dev_1/file-over", 4).await.unwrap();
    assert!(matches!(
        w.write(b"12345").await,
        Err(FileError::TooLarge(4))
    ));
    drop(w);
    assert!(matches!(
        store.create("../x", 4).await,
        Err(FileError::Name)
    ));
    store.remove("dev_1/file-small").await.unwrap();
    store.remove("dev_1/file-small").await.unwrap();
    assert!(matches!(
        store.open("dev_1/file-small").await,
        Err(FileError::NotFound)
    ));

    // Wrong bucket: a clear error, not a panic.
    let missing = S3Files::new(&config(&m.url, "no-such-bucket", ""), spool.path().into()).unwrap();
    let mut w = missing.create("dev_1/file-x", 100).await.unwrap();
    w.write(b"x").await.unwrap();
    assert!(matches!(w.commit().await, Err(FileError::Remote(_))));
}
