//! Where file bytes live: the [`FileStore`] trait, its local-directory implementation
//! ([`LocalDir`], the default: `data/files`) and the S3-compatible one ([`crate::s3::S3Files`]).
//!
//! Objects are named `DEVELOPER_ID/FILE_ID` (per-developer folders; the database row is what
//! grants access, the layout only keeps developers apart on disk). A write goes to a temporary
//! file beside the target and is renamed into place once complete and synced, so a crash never
//! leaves a half-written object under its name. Files and folders are owner-only (0600/0700):
//! they hold developers' prompts and model outputs.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWriteExt};

/// A readable object.
pub type Reader = Pin<Box<dyn AsyncRead + Send>>;

/// A file store failure.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("file not found")]
    NotFound,
    #[error("file too large: more than {0} bytes")]
    TooLarge(u64),
    #[error("invalid object name")]
    Name,
    #[error("object store: {0}")]
    Remote(String),
    #[error("file store: {0}")]
    Io(#[from] io::Error),
}

/// An object being written: bytes go in with [`Writer::write`] (to a local temporary file,
/// hashed and counted as they come), [`Writer::commit`] makes the object visible under its
/// name; dropping it uncommitted leaves nothing behind.
pub struct Writer {
    file: Option<tokio::fs::File>,
    tmp: PathBuf,
    target: Target,
    hasher: Sha256,
    bytes: u64,
    limit: u64,
}

/// Where a committed object goes.
pub(crate) enum Target {
    /// Renamed into place.
    Local(PathBuf),
    /// Uploaded (e.g. to S3), then the temporary file removed.
    Remote(Box<dyn Upload>),
}

/// Sends a spooled object to a remote store on commit.
#[async_trait]
pub(crate) trait Upload: Send + Sync {
    /// Sends the spooled file `tmp` of `bytes` bytes.
    async fn upload(&self, tmp: &Path, bytes: u64) -> Result<(), FileError>;
}

/// A committed object's size and sha256 (hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    pub sha256: String,
}

impl Writer {
    /// Appends bytes; `TooLarge` once the object passes the writer's limit.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), FileError> {
        self.bytes += chunk.len() as u64;
        if self.bytes > self.limit {
            return Err(FileError::TooLarge(self.limit));
        }
        self.hasher.update(chunk);
        let file = self.file.as_mut().ok_or(FileError::Name)?;
        file.write_all(chunk).await?;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Makes the object visible under its name: synced and renamed into place (local), or
    /// uploaded (S3).
    pub async fn commit(mut self) -> Result<Written, FileError> {
        let mut file = self.file.take().ok_or(FileError::Name)?;
        file.flush().await?;
        match &self.target {
            Target::Local(target) => {
                file.sync_all().await?;
                drop(file);
                tokio::fs::rename(&self.tmp, target).await?;
            }
            Target::Remote(dest) => {
                drop(file);
                let sent = dest.upload(&self.tmp, self.bytes).await;
                let _ = tokio::fs::remove_file(&self.tmp).await;
                sent?;
            }
        }
        Ok(Written {
            bytes: self.bytes,
            sha256: hex::encode(std::mem::take(&mut self.hasher).finalize()),
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Writer {
    /// A writer spooling into a new temporary file in `dir` (created owner-only when missing).
    pub(crate) async fn spool(
        dir: &Path,
        tmp_name: &str,
        target: Target,
        limit: u64,
    ) -> Result<Writer, FileError> {
        let owned = dir.to_owned();
        tokio::task::spawn_blocking(move || create_dir(&owned))
            .await
            .map_err(|e| FileError::Io(io::Error::other(e)))??;
        let tmp = dir.join(format!("{tmp_name}.tmp-{}", uuid::Uuid::now_v7().simple()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .await?;
        Ok(Writer {
            file: Some(file),
            tmp,
            target,
            hasher: Sha256::new(),
            bytes: 0,
            limit,
        })
    }
}

/// Where file bytes are kept.
#[async_trait]
pub trait FileStore: Send + Sync + 'static {
    /// Starts writing object `name`, refusing more than `limit` bytes.
    async fn create(&self, name: &str, limit: u64) -> Result<Writer, FileError>;
    /// Opens object `name` for reading.
    async fn open(&self, name: &str) -> Result<Reader, FileError>;
    /// Removes object `name`; a missing object is not an error.
    async fn remove(&self, name: &str) -> Result<(), FileError>;
}

/// Objects as files under one directory.
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    /// A store under `root` (created, owner-only, when missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<LocalDir, FileError> {
        let root = root.into();
        create_dir(&root)?;
        Ok(LocalDir { root })
    }

    /// The path of object `name`.
    fn path(&self, name: &str) -> Result<PathBuf, FileError> {
        let (dir, file) = check_name(name)?;
        Ok(self.root.join(dir).join(file))
    }
}

/// An object name's two plain segments (`DEVELOPER/FILE`: ASCII letters, digits, `_`, `-`).
pub(crate) fn check_name(name: &str) -> Result<(&str, &str), FileError> {
    let mut parts = name.split('/');
    let (Some(dir), Some(file), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(FileError::Name);
    };
    for p in [dir, file] {
        let plain = !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !plain {
            return Err(FileError::Name);
        }
    }
    Ok((dir, file))
}

pub(crate) fn create_dir(path: &Path) -> Result<(), FileError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    Ok(())
}

#[async_trait]
impl FileStore for LocalDir {
    async fn create(&self, name: &str, limit: u64) -> Result<Writer, FileError> {
        let target = self.path(name)?;
        let dir = target.parent().ok_or(FileError::Name)?.to_owned();
        let file_name = target
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or(FileError::Name)?
            .to_owned();
        // Beside the target: the rename stays on one file system.
        Writer::spool(&dir, &file_name, Target::Local(target), limit).await
    }

    async fn open(&self, name: &str) -> Result<Reader, FileError> {
        match tokio::fs::File::open(self.path(name)?).await {
            Ok(f) => Ok(Box::pin(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(FileError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    async fn remove(&self, name: &str) -> Result<(), FileError> {
        match tokio::fs::remove_file(self.path(name)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The object name of a developer's file.
pub fn object_name(developer_id: &str, file_id: &str) -> String {
    format!("{developer_id}/{file_id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn write_commit_read_remove() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalDir::new(tmp.path().join("files")).unwrap();
        let mut w = store.create("dev_1/file-a", 100).await.unwrap();
        w.write(b"hello ").await.unwrap();
        w.write(b"world").await.unwrap();
        assert!(
            store.open("dev_1/file-a").await.is_err(),
            "invisible until committed"
        );
        let written = w.commit().await.unwrap();
        assert_eq!(written.bytes, 11);
        assert_eq!(written.sha256.len(), 64);
        let mut text = String::new();
        store
            .open("dev_1/file-a")
            .await
            .unwrap()
            .read_to_string(&mut text)
            .await
            .unwrap();
        assert_eq!(text, "hello world");
        let meta = std::fs::metadata(tmp.path().join("files/dev_1/file-a")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        store.remove("dev_1/file-a").await.unwrap();
        store.remove("dev_1/file-a").await.unwrap();
        assert!(matches!(
            store.open("dev_1/file-a").await,
            Err(FileError::NotFound)
        ));
    }

    #[tokio::test]
    async fn limits_and_names() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalDir::new(tmp.path()).unwrap();
        let mut w = store.create("dev_1/file-b", 4).await.unwrap();
        assert!(matches!(
            w.write(b"12345").await,
            Err(FileError::TooLarge(4))
        ));
        drop(w);
        assert_eq!(
            std::fs::read_dir(tmp.path().join("dev_1")).unwrap().count(),
            0
        );
        for bad in ["../x", "a/../b", "a", "a/b/c", "a/.b", "/a/b"] {
            assert!(
                matches!(store.open(bad).await, Err(FileError::Name)),
                "{bad}"
            );
        }
    }
}
